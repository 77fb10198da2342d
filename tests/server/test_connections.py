"""The connection edge's pieces in-process: the listening socket under a descriptor shortage
and the log rate limit (the servers' side of both is in test_edges.py)."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from packserve.server.connections import SHORTAGE_GRACE_S, listen
from packserve.server.logs import RateLimit


@contextmanager
def no_descriptor_free() -> Iterator[None]:
    """The block runs with the descriptor limit at the lowest free descriptor: opening or
    accepting anything fails with EMFILE."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = listen("127.0.0.1", 0)
    sock.listen(8)
    sock.setblocking(False)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(2)]
    yield sock
    for c in clients:
        c.close()
    sock.close()


def test_a_short_descriptor_shortage_reads_as_nothing_pending_a_long_one_is_raised_once(
    listener: socket.socket,
) -> None:
    with no_descriptor_free():
        for _ in range(3):  # as asyncio's accept loop calls it, a connection pending
            with pytest.raises(BlockingIOError):
                listener.accept()
        time.sleep(SHORTAGE_GRACE_S)
        with pytest.raises(OSError) as raised:  # the shortage lasts: asyncio hears of it
            listener.accept()
        assert raised.value.errno == errno.EMFILE
        assert not isinstance(raised.value, BlockingIOError)
        for _ in range(3):  # the rest of that loop: once is enough
            with pytest.raises(BlockingIOError):
                listener.accept()
    connection, _ = listener.accept()  # descriptors again: the pending connections come
    connection.close()


def test_a_new_shortage_gets_the_grace_again(listener: socket.socket) -> None:
    with no_descriptor_free():
        with pytest.raises(BlockingIOError):
            listener.accept()
        time.sleep(SHORTAGE_GRACE_S)
    listener.accept()[0].close()  # it worked: the shortage is over
    with no_descriptor_free(), pytest.raises(BlockingIOError):
        listener.accept()


def _record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_rate_limit_groups_messages_by_their_first_line() -> None:
    limit = RateLimit(burst=2, window_s=60)
    # asyncio's "Exception in callback" records differ below the first line (the handle's
    # timestamp): one message for the limit.
    passed = [
        limit.filter(_record("asyncio", f"Exception in callback f()\nhandle: <when={i}>"))
        for i in range(5)
    ]
    assert passed == [True, True, False, False, False]
    assert limit.filter(_record("asyncio", "Exception in callback g()\nhandle: <when=9>"))
    assert limit.filter(_record("uvicorn.access", "GET / 200", logging.INFO))  # never limited
