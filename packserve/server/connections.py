"""The connection edge: uvicorn's h11 protocol plus the limits it lacks.

- A connection must deliver a request's headers within `header_timeout_s` of opening (or of
  its previous response): slowloris and silent connections are closed, not kept forever.
- At most `max_connections` are open. At the cap a new connection first evicts the oldest
  one still waiting for its request's headers (so probes get through an idle flood); if
  every connection is busy, the new one is answered 503 (an OpenAI error object,
  `Connection: close`) and closed at once. File descriptors never run out.
- A response whose client stops reading (the socket's send buffer stays full) for
  `stall_timeout_s` is dropped: the connection closes, the request is aborted and its KV freed.
  The send buffer is capped, so backpressure reaches the stream within a few hundred KiB;
  the stream then cuts a generation that falls 128 tokens behind (`streams.Backlog`).

Body read timeouts live in the body-limit middleware (`app.py`); idle keep-alive is uvicorn's
`timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("packserve.connections")
FD_RESERVE = 64  # descriptors kept for everything but client connections (model, logs, ...)
# The kernel's send buffer per connection. Autotuned, it grows to megabytes, so a client
# that stops reading would absorb megabytes of a stream before backpressure reached us;
# 256 KiB still streams tokens at full speed across a slow link.
SEND_BUFFER_BYTES = 256 * 1024
# How long a descriptor shortage at accept() may last before asyncio hears of it (see
# `Listener`); one at the connection cap lasts a few loop turns, a leak lasts.
SHORTAGE_GRACE_S = 1.0


def default_max_connections() -> int:
    """What the file-descriptor limit allows, less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(8, soft - FD_RESERVE)


class Listener(socket.socket):
    """The listening socket, with an accept() that keeps a short descriptor shortage from
    asyncio.

    asyncio's accept loop takes up to `backlog` connections per turn before any of them
    reaches the protocol (which evicts an idle one at the cap), so a burst at the connection
    cap can run the process out of descriptors for a few loop turns. On EMFILE asyncio logs,
    stops accepting and schedules a restart a second later, and then goes on calling accept()
    for the rest of its loop: a log record and a scheduled restart per pending connection
    (thousands; each restart that fires after shutdown logs a ValueError). Here a shortage
    reads as "nothing pending" (asyncio tries again next turn, by when the evictions have
    freed descriptors) for `SHORTAGE_GRACE_S`; one that lasts longer reaches asyncio once,
    and the calls after it in the same loop read "nothing pending" again.
    """

    _short_since: float | None = None  # when accept() first met EMFILE since it last worked

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            connection = super().accept()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            now = time.monotonic()
            if self._short_since is None:
                self._short_since = now
            if now - self._short_since < SHORTAGE_GRACE_S:
                raise BlockingIOError(errno.EAGAIN, "no descriptor free yet") from exc
            self._short_since = now
            raise
        self._short_since = None
        return connection


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything heavy is imported or loaded, so a taken
    port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = Listener(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _refusal(status: str, message: str, error_type: str) -> bytes:
    """A whole HTTP response: an OpenAI error object, Retry-After, Connection: close."""
    error = {"message": message, "type": error_type, "param": None, "code": None}
    body = json.dumps({"error": error}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"retry-after: 1\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


REFUSAL = _refusal(
    "503 Service Unavailable", "too many open connections; retry later", "service_unavailable"
)
QUEUE_FULL = _refusal(
    "429 Too Many Requests", "too many requests are waiting; retry later", "rate_limit_error"
)


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    header_timeout_s: float
    stall_timeout_s: float
    max_connections: int
    # Given a request's head (request line and headers, raw): whether to answer 429 at once.
    refuse_early: Callable[[bytes], bool]


def guarded_protocol(limits: EdgeLimits) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn (it builds one per connection): one per server,
    holding its limits and its connections that wait for headers."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "idle": {}})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a connection cap and a write-stall
    timeout (see the module docstring); `guarded_protocol` sets its limits."""

    limits: EdgeLimits
    idle: dict[GuardedH11Protocol, None]  # waiting for headers, oldest first (an ordered set)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._stall_deadline: asyncio.TimerHandle | None = None
        self._awaited_cycle: object = None  # the cycle current when headers were awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        if len(self.connections) > self.limits.max_connections:
            if self.idle:
                oldest = next(iter(self.idle))
                log.info("connection evicted: idle at the connection cap")
                oldest.transport.close()
                self.idle.pop(oldest, None)
            else:
                log.warning(
                    "connection refused: at the cap",
                    extra={"fields": {"max_connections": self.limits.max_connections}},
                )
                transport.write(REFUSAL)
                transport.close()
                return
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.idle.pop(self, None)
        for handle in (self._header_deadline, self._stall_deadline):
            if handle is not None:
                handle.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # A request that would be refused for a full queue is answered here, from its raw
        # head, before any parsing, task or framework: under a burst each refusal costs
        # microseconds and leaves at once. Anything less plain goes the normal way (where
        # the request gate refuses it too).
        between = self.cycle is None or self.cycle.response_complete
        if between and data.startswith(b"POST /v1/") and b"\r\n\r\n" in data:
            head = data[: data.index(b"\r\n\r\n")]
            if self.limits.refuse_early(head):
                self.transport.write(QUEUE_FULL)
                self.transport.close()
                return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._awaited_cycle:  # a request's headers arrived
            self.idle.pop(self, None)

    def on_response_complete(self) -> None:
        # Armed before uvicorn starts a pipelined request, which replaces `self.cycle`.
        self._expect_headers()
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_deadline is None:
            self._stall_deadline = self.loop.call_later(self.limits.stall_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_deadline is not None:
            self._stall_deadline.cancel()
            self._stall_deadline = None

    def _expect_headers(self) -> None:
        """Close the connection unless a new request's headers arrive in time."""
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._awaited_cycle = self.cycle  # a complete request's headers replace it
        self.idle[self] = None
        self._header_deadline = self.loop.call_later(
            self.limits.header_timeout_s, self._headers_late
        )

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.cycle is self._awaited_cycle and not self.transport.is_closing():
            log.info("connection closed: no request headers in time")
            self.transport.close()

    def _stalled(self) -> None:
        self._stall_deadline = None
        if not self.transport.is_closing():
            log.warning(
                "connection dropped: the client stopped reading",
                extra={"fields": {"stall_timeout_s": self.limits.stall_timeout_s}},
            )
            self.transport.abort()  # close() would wait for the buffer nobody reads
