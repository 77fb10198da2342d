"""The engine loop in a process of its own (vLLM's EngineCore split): the server's event loop
and the engine then never wait for each other's Python (one GIL each).

Two one-way pipes carry the core's dataclasses (pickled): messages in, CoreOutputs out. The
child loads the model, says Ready (or Failed, with the reason), then runs `EngineCore`; a
receiver thread moves incoming messages into its inbox. The child ends when the server closes
its pipe (or dies: the pipe closes with it), and ignores SIGINT and SIGTERM: the server decides
when to stop (it drains first).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from .config import EngineConfig
from .core import CoreOutput, EngineCore, Inbox, Message, Stopped
from .stats import EngineInfo

log = logging.getLogger("packserve.engine")
JOIN_TIMEOUT_S = 10.0  # a stopping child finishes its step and exits; then it is killed
# How the child's OpenMP threads wait between parallel regions, unless the operator set
# either variable: spin a bounded while (libgomp, which torch's CPU wheels use), then sleep.
# A step is hundreds of regions a few microseconds apart: sleeping after each one
# (OMP_WAIT_POLICY=PASSIVE) pays a wake-up per region, spinning without bound (libgomp's
# default, 300,000 spins) starves the server's event loop between steps. Measured on 2 cores,
# bench/omp_wait.py (results/omp_wait.md): 30,000 spins over passive, output tok/s SmolLM2
# c=16 1.29x, c=64 1.19x, tiny c=16 1.26x, c=64 0.99x (100,000: the same within noise);
# 300,000 spins gave SmolLM2 float32 c=64 39 tok/s where passive gave 128.
CHILD_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "30000"}


@dataclass(frozen=True, slots=True)
class Ready:
    info: EngineInfo
    model_path: str  # the folder the model was loaded from: the tokenizer's too


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


class EngineStartError(RuntimeError):
    """The engine process could not load the model (the reason is the message)."""


def _child(
    config: EngineConfig,
    inbound: Connection,
    outbound: Connection,
    setup: Callable[[], None] | None,
) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # sent to the whole group: the server drains
        signal.signal(sig, signal.SIG_IGN)
    if setup is not None:
        setup()
    from .engine import Engine  # torch: imported here, while the server imports its own side

    try:
        engine = Engine(config)
    except Exception as exc:
        outbound.send(Failed(f"{type(exc).__name__}: {exc}"))
        return
    gc.freeze()  # the model and libraries live as long as the process: out of the GC's scans
    inbox = Inbox()
    core = EngineCore(engine, inbox, outbound.send)

    def receive() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                inbox.put(inbound.recv())
        core.stop()  # the server closed its end or died

    outbound.send(Ready(engine.info, engine.model_path))
    threading.Thread(target=receive, name="packserve-engine-inbox", daemon=True).start()
    code = 0
    try:
        core.run()
    except Exception as exc:
        log.exception("engine loop stopped")
        with contextlib.suppress(OSError):
            outbound.send(Stopped(f"the engine loop stopped: {type(exc).__name__}: {exc}"))
        code = 1
    # Skip the interpreter's teardown: seconds of garbage collection over the model.
    logging.shutdown()
    os._exit(code)


@contextlib.contextmanager
def _child_environment(defaults: dict[str, str]) -> Iterator[None]:
    """Variables a spawned child starts with (it copies this process's environment), all of
    them unless any is already set; this process's environment is as before afterwards."""
    added = [] if any(k in os.environ for k in defaults) else list(defaults)
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            del os.environ[k]


class ProcessLink:
    """The server's end of an engine process: `spawn`, then from one event loop `ready`
    (raises EngineStartError if the model does not load), `attach`, `send`, `shutdown`."""

    def __init__(self, config: EngineConfig, setup: Callable[[], None] | None = None) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._inbound, to_child = context.Pipe(duplex=False)
        from_child, self._outbound = context.Pipe(duplex=False)
        self._process: BaseProcess = context.Process(
            target=_child,
            args=(config, from_child, to_child, setup),
            name="packserve-engine",
            daemon=True,
        )
        self._ends = (from_child, to_child)  # the child's: closed here once it has them
        self._attached = False
        self._lost = False

    def spawn(self) -> None:
        """Start the child (it imports torch and loads the model meanwhile): as early as
        possible, so its start overlaps the server's own."""
        with _child_environment(CHILD_ENV):
            self._process.start()
        for end in self._ends:
            end.close()

    async def ready(self) -> Ready:
        """Wait for the spawned child to load the model; EngineStartError if it cannot."""
        try:
            said = await asyncio.to_thread(self._inbound.recv)
        except (EOFError, OSError):
            await asyncio.to_thread(self._process.join, JOIN_TIMEOUT_S)
            raise EngineStartError(
                f"the engine process exited with code {self._process.exitcode} while loading"
            ) from None
        if isinstance(said, Failed):
            await asyncio.to_thread(self._process.join, JOIN_TIMEOUT_S)
            raise EngineStartError(said.reason)
        assert isinstance(said, Ready)
        return said

    def attach(self, receive: Callable[[CoreOutput | Stopped], None]) -> None:
        """Deliver everything the core emits to `receive`, on this event loop."""
        loop = asyncio.get_running_loop()
        fd = self._inbound.fileno()

        def readable() -> None:
            try:
                while self._inbound.poll():
                    receive(self._inbound.recv())
            except (EOFError, OSError):
                loop.remove_reader(fd)
                self._lost = True
                self._process.join(1.0)
                code = self._process.exitcode
                receive(Stopped(f"the engine process exited (code {code})"))

        loop.add_reader(fd, readable)
        self._attached = True

    def send(self, message: Message) -> None:
        try:
            self._outbound.send(message)
        except OSError:  # the child is gone; the reader reports it
            self._lost = True

    @property
    def alive(self) -> bool:
        return not self._lost and self._process.is_alive()

    def shutdown(self) -> None:
        """Close the child's inbox (it stops after its step), wait, then make sure."""
        if self._attached:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._inbound.fileno())
        self._outbound.close()
        if self._process.pid is None:
            return
        self._process.join(JOIN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(JOIN_TIMEOUT_S)
        self._inbound.close()
