"""The engine's LoRA adapters: which names are registered (from --lora-modules or loaded at run
time), and their weights read from disk on a worker thread when the scheduler reserves a pool
slot for them, so no step ever waits on the disk. The copy into the pool happens between steps
(`Engine.step`), and the scheduler admits the adapter's requests from the next step on.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from packserve.kernels.lora import LoRAWeights, read_adapter, read_adapter_config


class UnknownAdapter(ValueError, LookupError):
    """No adapter of that name is registered: a request naming it is refused like any bad
    request (ValueError), an unload of it is a lookup that failed (404)."""


@dataclass(frozen=True, slots=True)
class Adapter:
    """A registered adapter."""

    name: str
    path: str  # its PEFT folder
    # Seeds its requests' prefix-cache chains: unique per registration, so an adapter loaded
    # again under the same name never meets the K/V of the one it replaced.
    cache_salt: bytes


@dataclass(frozen=True, slots=True)
class FinishedRead:
    """An adapter read for a slot: its weights, or why they could not be read."""

    name: str
    slot: int
    weights: LoRAWeights | None
    error: str | None


class AdapterRegistry:
    """Registered adapters and the reads in flight. Owned by the engine thread; the reads run
    on one worker thread."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self.adapters: dict[str, Adapter] = {}
        self._uids = itertools.count()
        self._reads: dict[str, tuple[int, Future[LoRAWeights]]] = {}  # name -> (slot, read)
        self._worker: ThreadPoolExecutor | None = None  # started on the first read

    def register(self, name: str, path: str) -> Adapter:
        """Add an adapter after checking its folder and config (cheap: the weights are read
        when it is first needed). Raises ValueError (AdapterError) if it cannot be served."""
        if not name:
            raise ValueError("an adapter needs a name")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        read_adapter_config(path, self.max_rank)
        adapter = Adapter(name, path, f"lora:{next(self._uids)}".encode())
        self.adapters[name] = adapter
        return adapter

    def get(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
        return adapter

    def unregister(self, name: str) -> None:
        """Forget an adapter; a read in flight for it is dropped."""
        self.get(name)
        del self.adapters[name]
        read = self._reads.pop(name, None)
        if read is not None:
            read[1].cancel()

    def start(self, loads: list[tuple[str, int]]) -> None:
        """Read these (adapter, slot) on the worker thread."""
        if loads and self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="packserve-lora")
        for name, slot in loads:
            assert self._worker is not None
            path = self.adapters[name].path
            self._reads[name] = (slot, self._worker.submit(read_adapter, path, self.max_rank))

    @property
    def num_reading(self) -> int:
        return len(self._reads)

    def wait(self, timeout_s: float) -> None:
        """Block until a read finishes or `timeout_s` passes (an engine with nothing else to
        do waits here rather than spinning)."""
        wait([future for _, future in self._reads.values()], timeout_s, "FIRST_COMPLETED")

    def take_finished(self) -> list[FinishedRead]:
        """The reads that have finished since the last call."""
        finished = []
        for name, (slot, future) in list(self._reads.items()):
            if not future.done():
                continue
            del self._reads[name]
            try:
                finished.append(FinishedRead(name, slot, future.result(), None))
            except Exception as exc:  # a file that changed or vanished since it was checked
                finished.append(FinishedRead(name, slot, None, f"{type(exc).__name__}: {exc}"))
        return finished
