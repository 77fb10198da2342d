"""The engine loop, wherever it runs (a thread of the server, or a process of its own): take
in requests, aborts and calls between steps, step, and hand what each step produced to `emit`.

Everything that crosses between the loop and the server is one of the plain dataclasses
below, so the same loop serves both: a thread passes them by reference, a process pickles them.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packserve.scheduler import SamplingParams

from .outputs import Delta
from .stats import EngineLoad, StepStats

if TYPE_CHECKING:  # the engine (torch) loads where the loop runs, not where it is driven from
    from .engine import Engine

log = logging.getLogger("packserve.engine")
SETTLE_MAX_S = 0.01  # an idle engine waits at most this long for the rest of a burst


# -- into the loop -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    adapter: str | None = None  # a LoRA adapter's name; None: the base model


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Call:
    """Run `Engine.<method>(*args)` between two steps; the result comes back as a Reply."""

    call_id: int
    method: str
    args: tuple[Any, ...]


Message = Add | Abort | Call


# -- out of the loop -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CoreOutput:
    """What one turn of the loop produced: a step's deltas (and its figures), or, after
    taking in messages with no step, the refusals and replies. `load` is the engine's after
    it; `adds_taken` counts every Add the loop has taken in so far (refused ones too)."""

    load: EngineLoad
    adds_taken: int
    deltas: list[Delta] = field(default_factory=list)
    step_start: float = 0.0  # perf_counter seconds (one clock for every process on a host)
    stats: StepStats | None = None
    replies: list[Reply] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Stopped:
    """The loop ended for good: every request still open ends with this error."""

    reason: str


class Inbox:
    """The loop's thread-safe mailbox: put from any thread, taken by the loop."""

    def __init__(self) -> None:
        self._items: deque[Message] = deque()
        self._event = threading.Event()

    def put(self, message: Message) -> None:
        self._items.append(message)
        self._event.set()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)
        self._event.clear()

    def take(self) -> list[Message]:
        taken = []
        while self._items:
            taken.append(self._items.popleft())
        return taken

    def __len__(self) -> int:
        return len(self._items)


def _portable(exc: Exception) -> Exception:
    """The exception itself if it survives pickling (the engine may be another process),
    else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class EngineCore:
    """Steps one Engine, the only thread that touches it. `emit` gets every CoreOutput in
    order; `run` returns once `stop` is called and raises on a bug outside a step."""

    def __init__(self, engine: Engine, inbox: Inbox, emit: Callable[[CoreOutput], None]) -> None:
        self.engine = engine
        self.inbox = inbox
        self.emit = emit
        self._stopping = False
        self._adds_taken = 0
        self._open: set[str] = set()  # taken in and not yet finished

    def stop(self) -> None:
        """End `run` after the current step (any thread)."""
        self._stopping = True
        self.inbox.wake()

    def run(self) -> None:
        engine = self.engine
        while not self._stopping:
            if messages := self.inbox.take():
                refused, replies = self._take(messages)
                self._out(refused, replies=replies)
            if not engine.has_unfinished:
                self.inbox.wait(timeout=0.5)
                if len(self.inbox):
                    self._settle()
                continue
            start = time.perf_counter()
            try:
                deltas = engine.step()
            except Exception as exc:  # a scheduler or kernel bug must not end the loop
                log.exception("engine step failed")
                deltas = self._fail_all(f"{type(exc).__name__}: {exc}")
            self._out(deltas, start, engine.last_stats)

    def _out(
        self,
        deltas: list[Delta],
        step_start: float = 0.0,
        stats: StepStats | None = None,
        replies: list[Reply] | None = None,
    ) -> None:
        for delta in deltas:
            if delta.finish_reason is not None:
                self._open.discard(delta.request_id)
        load = self.engine.load()
        self.emit(CoreOutput(load, self._adds_taken, deltas, step_start, stats, replies or []))

    def _settle(self) -> None:
        """Work arrived at an idle engine: the rest of a burst is a few milliseconds behind
        (the server admits one HTTP request at a time), so wait while the inbox still grows,
        a millisecond at a time (at most SETTLE_MAX_S), and a burst starts in one step rather
        than two; then the packing window, if set."""
        deadline = time.perf_counter() + SETTLE_MAX_S
        seen = 0
        while len(self.inbox) > seen and time.perf_counter() < deadline:
            seen = len(self.inbox)
            time.sleep(0.001)
        if window := self.engine.config.packing_window_s:
            time.sleep(window)  # let more prompts arrive to fill bins

    def _take(self, messages: list[Message]) -> tuple[list[Delta], list[Reply]]:
        """Apply messages in order; the refused adds' error deltas and the calls' replies."""
        refused: list[Delta] = []
        replies: list[Reply] = []
        for message in messages:
            if isinstance(message, Add):
                self._adds_taken += 1
                try:
                    self.engine.add_request(
                        message.prompt_token_ids,
                        message.params,
                        message.request_id,
                        message.priority,
                        message.adapter,
                    )
                except ValueError as exc:
                    refused.append(Delta(message.request_id, (), "", "error", error=str(exc)))
                    continue
                self._open.add(message.request_id)
            elif isinstance(message, Abort):
                self._open.discard(message.request_id)
                self.engine.abort(message.request_id)
            else:
                replies.append(self._call(message))
        return refused, replies

    def _call(self, call: Call) -> Reply:
        try:
            return Reply(call.call_id, getattr(self.engine, call.method)(*call.args))
        except Exception as exc:
            return Reply(call.call_id, error=_portable(exc))

    def _fail_all(self, message: str) -> list[Delta]:
        deltas = []
        for request_id in sorted(self._open):
            self.engine.abort(request_id)
            deltas.append(Delta(request_id, (), "", "error", error=message))
        return deltas
