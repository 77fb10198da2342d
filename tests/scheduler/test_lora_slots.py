"""LoRA residency: `LoRASlots` alone and the scheduler admitting requests of many adapters
through few slots. Properties: an adapter is never evicted (nor moved) while a running request
uses it; never more than max_loras adapters hold slots; a request runs only once its adapter's
weights are in; every request finishes (no deadlock when adapters outnumber slots)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from packserve.scheduler import (
    LoRASlots,
    Request,
    RunnerOutput,
    SamplingParams,
    Scheduler,
)

from .harness import TEST_CONFIG
from .reference import NO_EOS

NAMES = [f"a{i}" for i in range(6)]


def check_slots(slots: LoRASlots, refs: dict[str, int]) -> None:
    resident = slots.resident
    assert len(resident) <= slots.max_loras
    assert len(set(resident.values())) == len(resident)  # one adapter per slot
    for name, count in refs.items():
        if count:
            assert name in resident and slots.is_loaded(name), f"{name} in use was evicted"
        assert slots.num_refs(name) == count


@settings(max_examples=200, deadline=None)
@given(
    max_loras=st.integers(1, 4),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["reserve", "load", "acquire", "release", "drop"]),
            st.sampled_from(NAMES),
        ),
        max_size=80,
    ),
)
def test_slots_never_evict_a_used_adapter(max_loras: int, ops: list[tuple[str, str]]) -> None:
    slots = LoRASlots(max_loras)
    refs = dict.fromkeys(NAMES, 0)
    pinned: dict[str, int] = {}  # slots of adapters in use: they must not move
    for op, name in ops:
        if op == "reserve":
            before = slots.slot_of(name)
            slot = slots.reserve(name)
            if slot is None:  # nothing free or idle: every slot is used or loading
                assert len(slots.resident) == max_loras
                assert all(refs[n] or not slots.is_loaded(n) for n in slots.resident)
            elif before is not None:
                assert slot == before
        elif op == "load" and slots.slot_of(name) is not None and not slots.is_loaded(name):
            slots.mark_loaded(name)
        elif op == "acquire" and slots.is_loaded(name):
            pinned[name] = slots.acquire(name)
            refs[name] += 1
        elif op == "release" and refs[name]:
            slots.release(name)
            refs[name] -= 1
            if not refs[name]:
                del pinned[name]
        elif op == "drop" and not refs[name]:
            slots.drop(name)
            assert slots.slot_of(name) is None
        check_slots(slots, refs)
        for n, slot in pinned.items():
            assert slots.slot_of(n) == slot


def test_least_recently_used_idle_adapter_goes_first() -> None:
    slots = LoRASlots(2)
    for name in ("a", "b"):
        slots.reserve(name)
        slots.mark_loaded(name)
    slots.acquire("a")
    slots.release("a")  # a: used after b, so b is the older
    assert slots.reserve("c") == 1  # b's slot
    assert slots.resident == {"a": 0, "c": 1} and slots.num_evictions_total == 1
    assert slots.take_loads() == [("a", 0), ("b", 1), ("c", 1)]
    slots.acquire("a")
    assert slots.reserve("d") is None  # a in use, c still loading: d waits
    slots.mark_loaded("c")
    slots.acquire("c")
    assert slots.reserve("d") is None  # both in use
    slots.release("c")
    assert slots.reserve("d") == 1 and slots.take_loads() == [("d", 1)]


@settings(max_examples=60, deadline=None)
@given(
    max_loras=st.integers(1, 3),
    num_kv_blocks=st.integers(8, 40),
    requests=st.lists(
        st.tuples(
            st.integers(1, 12),  # prompt length
            st.integers(1, 6),  # max_tokens
            st.sampled_from([None, *NAMES]),  # adapter
        ),
        min_size=1,
        max_size=24,
    ),
    load_delay=st.integers(0, 3),  # steps an adapter read takes
)
def test_scheduler_runs_requests_only_with_their_adapter_resident(
    max_loras: int, num_kv_blocks: int, requests: list, load_delay: int
) -> None:
    config = dataclasses.replace(
        TEST_CONFIG, max_loras=max_loras, num_kv_blocks=num_kv_blocks, max_num_seqs=4
    )
    scheduler = Scheduler(config, NO_EOS)
    for i, (n, max_tokens, name) in enumerate(requests):
        request = Request(f"r{i}", [1 + i % 7] * n, SamplingParams(max_tokens=max_tokens))
        request.adapter = name
        request.cache_salt = name.encode() if name else b""
        scheduler.add(request)
    reading: dict[str, int] = {}  # adapter -> steps left before its weights are in
    slot_of_running: dict[str, int] = {}
    for _ in range(2000):
        if not scheduler.has_unfinished:
            break
        for name in list(reading):  # between steps: finished reads are copied in
            reading[name] -= 1
            if reading[name] < 0:
                del reading[name]
                scheduler.lora.mark_loaded(name)
        output = scheduler.schedule()
        for name, _ in scheduler.lora.take_loads():
            reading[name] = load_delay
        lora = scheduler.lora
        for new in output.new_requests:
            name = scheduler.requests[new.request_id].adapter
            assert new.lora_slot == (-1 if name is None else lora.slot_of(name))
        refs = {name: 0 for name in NAMES}
        for request in scheduler.running:
            if request.adapter is not None:
                refs[request.adapter] += 1
                slot = lora.slot_of(request.adapter)
                assert slot_of_running.setdefault(request.request_id, slot) == slot
        check_slots(lora, refs)
        for request_id in output.preempted_ids:
            slot_of_running.pop(request_id, None)
        sampled = {seq.request_id: 3 for seq in output.segments if seq.sample}
        scheduler.update(output, RunnerOutput(sampled_token_ids=sampled, logprobs={}))
        for request_id in list(slot_of_running):
            if request_id not in scheduler.requests:
                del slot_of_running[request_id]
    assert not scheduler.has_unfinished, "requests left waiting for adapters"
