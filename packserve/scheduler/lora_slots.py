"""Residency of LoRA adapters in the runner's weight pool: which adapter holds which slot, how
many running requests use each, and which unused ones go first when a slot is needed. Pure
Python: the scheduler admits a request only once its adapter is resident (S-LoRA's scheme, with
the pool's slots standing in for its unified memory pages).

An adapter's slot passes through three states: reserved (`reserve`: the engine is reading the
weights and will copy them into the pool between steps), resident (`mark_loaded`), and free
again (evicted, least recently used first, only while no running request uses it; or dropped
when the adapter is unloaded). Invariants: at most `max_loras` adapters hold slots; an adapter
used by a running request (`acquire` without `release`) is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Slot:
    name: str
    loaded: bool = False  # False while its weights are on their way into the pool
    num_refs: int = 0  # running requests using it


class LoRASlots:
    """Slot accounting for `max_loras` resident adapters (0: no adapters served)."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slots: dict[str, int] = {}  # adapter name -> slot
        self._state: list[_Slot | None] = [None] * max_loras  # slot -> what it holds
        # Loaded adapters no running request uses, least recently used first: evicted in order.
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._new_loads: list[tuple[str, int]] = []  # reserved since `take_loads`
        self.num_loads_total = 0
        self.num_evictions_total = 0

    # -- queries --------------------------------------------------------------------------------

    def slot_of(self, name: str) -> int | None:
        """The slot an adapter holds (loaded or on its way), None if it holds none."""
        return self._slots.get(name)

    def is_loaded(self, name: str) -> bool:
        slot = self._slots.get(name)
        return slot is not None and self._holder(slot).loaded

    def num_refs(self, name: str) -> int:
        slot = self._slots.get(name)
        return 0 if slot is None else self._holder(slot).num_refs

    @property
    def resident(self) -> dict[str, int]:
        """Adapter name -> slot, for every adapter holding one."""
        return dict(self._slots)

    # -- changes --------------------------------------------------------------------------------

    def reserve(self, name: str) -> int | None:
        """Give `name` a slot for its weights to be copied into: a free one, else the least
        recently used idle adapter's (evicted). Returns the slot (also if it already holds
        one), or None while every slot is in use or loading; a new reservation is reported
        once by `take_loads`."""
        slot = self._slots.get(name)
        if slot is not None:
            return slot
        slot = next((s for s, held in enumerate(self._state) if held is None), None)
        if slot is None:
            if not self._idle:
                return None
            victim, _ = self._idle.popitem(last=False)
            slot = self._slots.pop(victim)
            self.num_evictions_total += 1
        self._slots[name] = slot
        self._state[slot] = _Slot(name)
        self._new_loads.append((name, slot))
        return slot

    def take_loads(self) -> list[tuple[str, int]]:
        """(adapter, slot) reserved since the last call: the weights to read and copy."""
        loads, self._new_loads = self._new_loads, []
        return loads

    def mark_loaded(self, name: str) -> None:
        """The adapter's weights are in its slot: requests using it may be admitted."""
        held = self._holder(self._slots[name])
        held.loaded = True
        self.num_loads_total += 1
        self._idle[name] = None  # nobody uses it yet

    def touch(self, name: str) -> None:
        """A waiting request wants the adapter: if idle, it becomes the last one evicted."""
        if name in self._idle:
            self._idle.move_to_end(name)

    def acquire(self, name: str) -> int:
        """A request using the (loaded) adapter is admitted: its slot, pinned until released."""
        held = self._holder(self._slots[name])
        assert held.loaded, f"adapter {name!r} is not loaded yet"
        held.num_refs += 1
        self._idle.pop(name, None)
        return self._slots[name]

    def release(self, name: str) -> None:
        """A request using the adapter stopped running (finished or preempted)."""
        held = self._holder(self._slots[name])
        held.num_refs -= 1
        assert held.num_refs >= 0
        if held.num_refs == 0:
            self._idle[name] = None  # the most recently used idle adapter

    def drop(self, name: str) -> None:
        """Forget an adapter (unloaded, or its weights failed to read): its slot is free.
        Callers end its running requests first."""
        slot = self._slots.pop(name, None)
        if slot is None:
            return
        assert self._holder(slot).num_refs == 0, f"adapter {name!r} is in use"
        self._state[slot] = None
        self._idle.pop(name, None)
        self._new_loads = [(n, s) for n, s in self._new_loads if n != name]

    def _holder(self, slot: int) -> _Slot:
        held = self._state[slot]
        assert held is not None
        return held
