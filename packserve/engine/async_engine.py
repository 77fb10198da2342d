"""The engine loop: one background thread steps the engine; asyncio handlers talk to it
through thread-safe queues and per-request collectors."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from packserve.scheduler import SamplingParams, StructuredOutput

from .engine import Engine
from .outputs import Delta
from .stats import EngineLoad, StepStats
from .text import decode

log = logging.getLogger("packserve.engine")
SETTLE_MAX_S = 0.01  # an idle engine waits at most this long for the rest of a burst


@dataclass(frozen=True, slots=True)
class Timed:
    """A delta with the start time of the step that produced it (perf_counter seconds)."""

    delta: Delta
    step_start: float


@dataclass(slots=True)
class _Call:
    method: str
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    collector: asyncio.Queue[Timed]
    loop: asyncio.AbstractEventLoop
    priority: int
    adapter: str | None  # LoRA adapter; None: the base model


def _deliver(batch: list[tuple[_Submission, Timed]]) -> None:
    """On the event loop: put each item into its request's collector."""
    for sub, item in batch:
        sub.collector.put_nowait(item)


def _settle_future(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the event loop: hand an engine call's outcome to its waiter (if still waiting)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class AsyncEngine:
    """Runs `Engine.step` in one thread. Adds and aborts are queued and drained between steps,
    so the engine is only ever touched by its own thread; other threads read `info` (frozen),
    `tokenizer` and `load` (a snapshot republished after every step and drain)."""

    def __init__(
        self,
        engine: Engine,
        on_step: Callable[[StepStats, EngineLoad], None] | None = None,
    ) -> None:
        self._engine = engine
        self.info = engine.info
        # The event loop's own copy: a Hugging Face tokenizer is not safe to share between
        # threads, and the engine thread decodes with the engine's.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.load = engine.load()
        self.on_step = on_step  # engine thread, after every step
        self.packing_window_s = engine.config.packing_window_s
        self._adds: deque[_Submission] = deque()
        self._aborts: deque[str] = deque()
        self._calls: deque[_Call] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._collectors: dict[str, _Submission] = {}  # owned by the loop thread
        self._thread = threading.Thread(target=self._run, name="packserve-engine", daemon=True)
        self.num_in_flight = 0  # submitted and not yet finished; read by handlers (approximate)

    # -- asyncio side ---------------------------------------------------------------------------

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return decode(self.tokenizer, token_ids, skip_special_tokens)

    def compile_grammar(self, constraint: StructuredOutput) -> Future:
        """Compile a constraint on the grammar worker (cached); the future fails with a
        ValueError if it is invalid. Requests with it are scheduled once it is compiled."""
        return self._engine.compile_grammar(constraint)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: queued here or waiting in the scheduler."""
        return len(self._adds) + self.load.num_waiting

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        collector: asyncio.Queue[Timed],
        priority: int = 0,
        adapter: str | None = None,
    ) -> None:
        """Queue a request; its deltas will arrive in `collector` (the choices of one HTTP
        request share one). Synchronous, so a handler's queue-limit check and its submission
        happen in the same event-loop turn. Pair every submit with a `release`. A lower
        `priority` is scheduled first (vLLM's convention)."""
        self.num_in_flight += 1
        loop = asyncio.get_running_loop()
        self._adds.append(
            _Submission(request_id, prompt_token_ids, params, collector, loop, priority, adapter)
        )
        self._wake.set()

    def release(self, request_id: str, finished: bool) -> None:
        """The caller is done with a request; an unfinished one (a client that left, a
        timeout) is aborted in the engine within one step."""
        self.num_in_flight -= 1
        if not finished:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request within one step (its KV is freed); no more deltas arrive for it.
        Aborting a finished or unknown request does nothing."""
        self._aborts.append(request_id)
        self._wake.set()

    async def call(self, method: str, *args: Any) -> Any:
        """Run `Engine.<method>(*args)` on the engine's own thread between two steps (the
        engine is touched by no other); returns its result or raises its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.append(_Call(method, args, future, loop))
        self._wake.set()
        return await future

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug outside a step: say so, end every request, stop
            log.exception("engine loop stopped")
            self._stop.set()
            message = f"the engine loop stopped: {type(exc).__name__}: {exc}"
            while self._adds:  # submitted, never taken in: they end too
                sub = self._adds.popleft()
                self._collectors[sub.request_id] = sub
            ids = list(self._collectors)
            self._publish([Timed(Delta(r, (), "", "error", error=message), 0.0) for r in ids])

    def _loop(self) -> None:
        engine = self._engine
        while not self._stop.is_set():
            if self._drain():
                self.load = engine.load()
            if not engine.has_unfinished:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                if self._adds:
                    self._settle()
                continue
            start = time.perf_counter()
            try:
                deltas = engine.step()
            except Exception as exc:  # a scheduler bug must not kill the loop: fail everyone
                log.exception("engine step failed")
                deltas = self._fail_all(f"{type(exc).__name__}: {exc}")
            self.load = engine.load()
            self._publish([Timed(delta, start) for delta in deltas])
            if self.on_step and engine.last_stats is not None:
                self.on_step(engine.last_stats, self.load)

    def _settle(self) -> None:
        """Work arrived at an idle engine: the rest of a burst is a few milliseconds behind
        (the event loop admits one HTTP request at a time), so wait while the queue still
        grows, a millisecond at a time (at most SETTLE_MAX_S), and a burst starts in one step
        rather than two; then the packing window, if set."""
        deadline = time.perf_counter() + SETTLE_MAX_S
        seen = 0
        while len(self._adds) > seen and time.perf_counter() < deadline:
            seen = len(self._adds)
            time.sleep(0.001)
        if self.packing_window_s:
            time.sleep(self.packing_window_s)  # let more prompts arrive to fill bins

    def _drain(self) -> bool:
        """Take in queued adds and aborts; True if there were any."""
        changed = bool(self._adds or self._aborts or self._calls)
        while self._calls:
            self._run_call(self._calls.popleft())
        while self._adds:
            sub = self._adds.popleft()
            try:
                self._engine.add_request(
                    sub.prompt_token_ids, sub.params, sub.request_id, sub.priority, sub.adapter
                )
            except ValueError as exc:
                error = Delta(sub.request_id, (), "", "error", error=str(exc))
                self._send(sub, Timed(error, 0.0))
                continue
            self._collectors[sub.request_id] = sub
        while self._aborts:
            request_id = self._aborts.popleft()
            self._collectors.pop(request_id, None)
            self._engine.abort(request_id)
        return changed

    def _run_call(self, call: _Call) -> None:
        try:
            result = getattr(self._engine, call.method)(*call.args)
        except Exception as exc:
            outcome = partial(_settle_future, call.future, None, exc)
        else:
            outcome = partial(_settle_future, call.future, result, None)
        with contextlib.suppress(RuntimeError):
            call.loop.call_soon_threadsafe(outcome)

    def _publish(self, items: list[Timed]) -> None:
        """Hand a step's deltas to their collectors: one wake-up per event loop per step."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Submission, Timed]]] = {}
        for item in items:
            sub = self._collectors.get(item.delta.request_id)
            if sub is None:
                continue
            if item.delta.finish_reason is not None:
                del self._collectors[item.delta.request_id]
            batches.setdefault(sub.loop, []).append((sub, item))
        for loop, batch in batches.items():
            # RuntimeError: the caller's event loop is gone; nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, batch)

    @staticmethod
    def _send(sub: _Submission, item: Timed) -> None:
        with contextlib.suppress(RuntimeError):
            sub.loop.call_soon_threadsafe(_deliver, [(sub, item)])

    def _fail_all(self, message: str) -> list[Delta]:
        deltas = []
        for request_id in list(self._collectors):
            self._engine.abort(request_id)
            deltas.append(Delta(request_id, (), "", "error", error=message))
        return deltas
