"""The server's handle on the engine loop: asyncio handlers submit, abort and call through it,
and every request's deltas come back into its own collector, on the event loop.

The loop itself (`core.EngineCore`) runs behind a link: a thread of this process
(`AsyncEngine.in_thread`) or a process of its own (`AsyncEngine.in_process`, the server's
default), so the HTTP side and the engine never hold one GIL between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from packserve.kernels.loader import load_tokenizer
from packserve.scheduler import SamplingParams, StructuredOutput

from .config import EngineConfig
from .core import Abort, Add, Call, CoreOutput, EngineCore, Inbox, Message, Stopped
from .engine import Engine
from .outputs import Delta
from .process import ProcessLink
from .stats import EngineInfo, EngineLoad, StepStats
from .structured import GrammarCompiler
from .text import decode

log = logging.getLogger("packserve.engine")

Receive = Callable[[CoreOutput | Stopped], None]


@dataclass(frozen=True, slots=True)
class Timed:
    """A delta with the start time of the step that produced it (perf_counter seconds)."""

    delta: Delta
    step_start: float


class Link(Protocol):
    """Where the engine loop runs. `attach` and `send` are called on the event loop;
    `receive` is called there too."""

    def attach(self, receive: Receive) -> None: ...
    def send(self, message: Message) -> None: ...
    @property
    def alive(self) -> bool: ...
    def shutdown(self) -> None: ...


class ThreadLink:
    """The engine loop in a thread of this process."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._inbox = Inbox()
        self._core: EngineCore | None = None
        self._thread: threading.Thread | None = None

    def attach(self, receive: Receive) -> None:
        loop = asyncio.get_running_loop()

        def emit(out: CoreOutput | Stopped) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody listens
                loop.call_soon_threadsafe(receive, out)

        core = EngineCore(self._engine, self._inbox, emit)

        def run() -> None:
            try:
                core.run()
            except Exception as exc:  # a bug outside a step: say so, end every request
                log.exception("engine loop stopped")
                emit(Stopped(f"the engine loop stopped: {type(exc).__name__}: {exc}"))

        self._core = core
        self._thread = threading.Thread(target=run, name="packserve-engine", daemon=True)
        self._thread.start()

    def send(self, message: Message) -> None:
        self._inbox.put(message)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        if self._core is not None and self._thread is not None:
            self._core.stop()
            self._thread.join(timeout=10)


class AsyncEngine:
    """Submit, abort and call from the event loop; each request's deltas arrive in the
    collector it was submitted with (the choices of one HTTP request share one). `info` is
    frozen; `load` is the engine's state after its latest step or intake. `tokenizer` is this
    side's own (a Hugging Face tokenizer is not safe to share between threads)."""

    def __init__(
        self,
        info: EngineInfo,
        tokenizer: Any,
        grammars: GrammarCompiler,
        link: Link,
        on_step: Callable[[StepStats, EngineLoad], None] | None = None,
        load: EngineLoad | None = None,
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self._grammars = grammars
        self._link = link
        self.on_step = on_step  # on the event loop, after every step
        self.load = load or EngineLoad(0, 0, 0, info.num_kv_blocks, ())
        self._collectors: dict[str, asyncio.Queue[Timed]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._adds_sent = 0
        self._adds_taken = 0
        self._stopped: str | None = None
        self._started = False
        self.num_in_flight = 0  # submitted and not yet released; read by the drain

    @classmethod
    def in_thread(
        cls, engine: Engine, on_step: Callable[[StepStats, EngineLoad], None] | None = None
    ) -> AsyncEngine:
        """The loop in a thread of this process, over an Engine already built."""
        tokenizer = copy.deepcopy(engine.tokenizer)
        link = ThreadLink(engine)
        return cls(engine.info, tokenizer, engine.grammars, link, on_step, engine.load())

    @classmethod
    async def in_process(
        cls,
        config: EngineConfig,
        on_step: Callable[[StepStats, EngineLoad], None] | None = None,
        link: ProcessLink | None = None,
    ) -> AsyncEngine:
        """The loop in a process of its own, which loads the model: `link`, already spawned
        (the server spawns it first thing), or a new one over `config`; raises
        process.EngineStartError if the model does not load."""
        if link is None:
            link = ProcessLink(config)
            link.spawn()
        try:
            ready = await link.ready()
            tokenizer = await asyncio.to_thread(
                load_tokenizer, ready.model_path, config.trust_remote_code
            )
        except BaseException:
            link.shutdown()
            raise
        info = ready.info
        grammars = GrammarCompiler(tokenizer, info.vocab_size, info.eos_token_ids)
        return cls(info, tokenizer, grammars, link, on_step)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering (call on the event loop that will use this engine)."""
        self._link.attach(self._receive)
        self._started = True

    def shutdown(self) -> None:
        self._link.shutdown()
        self._grammars.shutdown()

    @property
    def alive(self) -> bool:
        return self._started and self._stopped is None and self._link.alive

    # -- requests -------------------------------------------------------------------------------

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return decode(self.tokenizer, token_ids, skip_special_tokens)

    def compile_grammar(self, constraint: StructuredOutput) -> Future:
        """Compile a constraint on this side's grammar worker (cached): the future fails
        with a ValueError if it is invalid, so a bad one is a 400 before it is submitted.
        (The engine compiles it for itself, from its own cache, when the request arrives.)"""
        return self._grammars.compile(constraint)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: on their way to the engine or waiting in it."""
        return self._adds_sent - self._adds_taken + self.load.num_waiting

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        collector: asyncio.Queue[Timed],
        priority: int = 0,
        adapter: str | None = None,
    ) -> None:
        """Queue a request (on `adapter`, a LoRA adapter's name; None: the base model); its
        deltas will arrive in `collector`. Synchronous, so a
        handler's queue-limit check and its submission happen in the same event-loop turn.
        Pair every submit with a `release`. A lower `priority` is scheduled first (vLLM's
        convention)."""
        self.num_in_flight += 1
        if self._stopped is not None:
            collector.put_nowait(Timed(_failed(request_id, self._stopped), 0.0))
            return
        self._collectors[request_id] = collector
        self._adds_sent += 1
        self._link.send(Add(request_id, prompt_token_ids, params, priority, adapter))

    def release(self, request_id: str, finished: bool) -> None:
        """The caller is done with a request; an unfinished one (a client that left, a
        timeout) is aborted in the engine within one step."""
        self.num_in_flight -= 1
        if not finished:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request within one step (its KV is freed); no more deltas arrive for it.
        Aborting a finished or unknown request does nothing."""
        if self._collectors.pop(request_id, None) is not None:
            self._link.send(Abort(request_id))

    async def call(self, method: str, *args: Any) -> Any:
        """Run `Engine.<method>(*args)` in the engine loop between two steps (the engine is
        touched by nothing else); returns its result or raises its exception. Arguments and
        result must pickle: the engine may be another process."""
        if self._stopped is not None:
            raise RuntimeError(self._stopped)
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._link.send(Call(call_id, method, args))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    # -- from the loop --------------------------------------------------------------------------

    def _receive(self, out: CoreOutput | Stopped) -> None:
        if isinstance(out, Stopped):
            self._stop(out.reason)
            return
        self.load = out.load
        self._adds_taken = out.adds_taken
        for delta in out.deltas:
            collector = self._collectors.get(delta.request_id)
            if collector is None:  # aborted here meanwhile
                continue
            if delta.finish_reason is not None:
                del self._collectors[delta.request_id]
            collector.put_nowait(Timed(delta, out.step_start))
        for reply in out.replies:
            future = self._calls.get(reply.call_id)
            if future is None or future.done():
                continue
            if reply.error is not None:
                future.set_exception(reply.error)
            else:
                future.set_result(reply.value)
        if out.stats is not None and self.on_step is not None:
            self.on_step(out.stats, out.load)

    def _stop(self, reason: str) -> None:
        """The loop is gone: end every open request and call with the reason."""
        log.error(reason)
        self._stopped = reason
        for request_id, collector in self._collectors.items():
            collector.put_nowait(Timed(_failed(request_id, reason), 0.0))
        self._collectors.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(RuntimeError(reason))


def _failed(request_id: str, reason: str) -> Delta:
    return Delta(request_id, (), "", "error", error=reason)
