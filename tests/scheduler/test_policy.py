"""Service order: priority (lower first), then shortest-first with its fairness bound or fcfs;
preemption victims by (priority, admission). Every step also goes through the harness's
checks, which hold each step to the documented order up to the reasons a request may be
passed over."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .harness import Harness, config, ids, prompt
from .reference import NO_EOS, VOCAB, reference


def first_served(h: Harness) -> list[str]:
    """Request ids in the order of their first segment (ties within a step: by id)."""
    order: list[str] = []
    for out in h.history:
        new = sorted({s.request_id for s in out.segments} - set(order))
        order += new
    return order


@pytest.mark.parametrize("policy", ["fcfs", "shortest-first"])
def test_lower_priority_value_is_admitted_first(policy):
    h = Harness(config(max_num_seqs=1, policy=policy), eos=NO_EOS)
    h.add("low", prompt(1, 3), priority=2, max_tokens=1)
    h.add("high", prompt(2, 3), priority=0, max_tokens=1)
    h.add("mid", prompt(3, 3), priority=1, max_tokens=1)
    h.run()
    assert first_served(h) == ["high", "mid", "low"]


def test_priority_comes_before_shortest_first():
    h = Harness(config(max_num_seqs=1), eos=NO_EOS)
    h.add("short", prompt(1, 2), priority=1, max_tokens=1)
    h.add("long", prompt(2, 20), priority=0, max_tokens=1)
    h.run()
    assert first_served(h) == ["long", "short"]


def test_shortest_first_admits_the_shortest_uncached_prefill():
    h = Harness(config(max_num_seqs=1), eos=NO_EOS)
    for rid, n in [("a", 9), ("b", 3), ("c", 6)]:
        h.add(rid, prompt(ord(rid), n), max_tokens=1)
    h.run()
    assert first_served(h) == ["b", "c", "a"]
    fcfs = Harness(config(max_num_seqs=1, policy="fcfs"), eos=NO_EOS)
    for rid, n in [("a", 9), ("b", 3), ("c", 6)]:
        fcfs.add(rid, prompt(ord(rid), n), max_tokens=1)
    fcfs.run()
    assert first_served(fcfs) == ["a", "b", "c"]


def test_a_cached_prefix_shortens_the_prefill_it_is_ordered_by():
    # "long" repeats a finished prompt of 17 tokens plus 2: 16 of its 19 are cached, so its
    # uncached prefill (3) is shorter than "short"'s (5).
    h = Harness(config(max_num_seqs=1), eos=NO_EOS)
    h.add("first", prompt(1, 17), max_tokens=1)
    h.run()
    h.add("short", prompt(2, 5), max_tokens=1)
    h.add("long", prompt(1, 17) + [3, 4], max_tokens=1)
    out, _ = h.step()
    assert [(s.request_id, s.start_pos) for s in out.prefills] == [("long", 16)]
    h.run()


def test_preemption_takes_the_highest_priority_value_not_the_latest():
    # Block size 1, 4 blocks: A (priority 1) runs first; B and C (priority 0) join. When A
    # needs a block, the victim is A itself: the highest (priority, admission).
    cfg = config(max_model_len=4, num_kv_blocks=4, block_size=1, enable_prefix_caching=False)
    h = Harness(cfg, eos=NO_EOS)
    h.add("A", [1], priority=1, max_tokens=3)
    h.step()
    h.add("B", [2], max_tokens=3)
    h.add("C", [3], max_tokens=3)
    h.step()  # A decodes; B and C prefill: the pool is full
    out, _ = h.step()
    assert out.preempted_ids == ("A",)
    assert [s.request_id for s in out.decodes] == ["B", "C"]
    out, _ = h.step()  # B needs a block: between B and C (equal priority), C is the later
    assert out.preempted_ids == ("C",)
    h.run()
    for rid, p in [("A", [1]), ("B", [2]), ("C", [3])]:
        assert h.tokens(rid) == reference(p, h.requests[rid].params, (), 4)[0]


def stream_of_short_prompts(policy, fairness_steps, budget, long_len, short_len, extra):
    """A long prompt, then each step enough short ones (later arrivals) to fill the budget.
    Returns the harness once the long prompt finished (or after 100 steps)."""
    cfg = config(
        max_model_len=64,
        num_kv_blocks=1024,
        max_num_seqs=budget,  # each short one ends at its prefill: seats are never short
        max_num_batched_tokens=budget,
        fairness_steps=fairness_steps,
        policy=policy,
        enable_prefix_caching=False,
    )
    h = Harness(cfg, eos=NO_EOS)
    h.add("long", prompt(0, long_len), max_tokens=1)
    n = 0
    for _ in range(100):
        for _ in range(math.ceil(budget / short_len) + extra):
            n += 1
            h.add(f"s{n}", prompt(n, short_len), max_tokens=1)
        h.step()
        if "long" in h.reasons:
            break
    return h


def test_an_overtaken_prompt_goes_first_after_fairness_steps():
    h = stream_of_short_prompts("shortest-first", 2, 8, 20, 4, 0)
    long_steps = [i for i, out in enumerate(h.history) if "long" in ids(out.prefills)]
    assert long_steps == [2, 3, 4]  # overtaken in steps 0 and 1, then served first
    assert all(len(out.prefills) == 2 for out in h.history[:2])  # two shorts fill each step
    fcfs = stream_of_short_prompts("fcfs", 2, 8, 20, 4, 0)
    assert [i for i, out in enumerate(fcfs.history) if "long" in ids(out.prefills)] == [0, 1, 2]


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from(["shortest-first", "fcfs"]),
    fairness_steps=st.integers(1, 5),
    budget=st.integers(4, 12),
    data=st.data(),
)
def test_a_long_prompt_among_short_ones_is_served_within_the_fairness_bound(
    policy, fairness_steps, budget, data
):
    long_len = data.draw(st.integers(budget + 1, 40))
    short_len = data.draw(st.integers(1, min(budget, long_len - 1)))
    extra = data.draw(st.integers(0, 2))
    h = stream_of_short_prompts(policy, fairness_steps, budget, long_len, short_len, extra)
    steps = [i for i, out in enumerate(h.history) if "long" in ids(out.prefills)]
    # Overtaken in at most fairness_steps steps (none under fcfs), then first in line: the
    # whole budget every step until its prefill is done.
    wait = fairness_steps if policy == "shortest-first" else 0
    assert steps[0] <= wait
    assert steps == list(range(steps[0], steps[0] + len(steps)))
    assert len(steps) <= math.ceil(long_len / budget) + 1
    assert h.reasons["long"] == "length"
    assert h.first_token_step["long"] <= wait + math.ceil(long_len / budget)


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from(["shortest-first", "fcfs"]),
    budget=st.integers(8, 24),
    jobs=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 20)),  # (priority, prompt length)
        min_size=1,
        max_size=8,
    ),
)
def test_arriving_together_requests_are_served_by_priority_then_policy(policy, budget, jobs):
    # One seat: each runs alone, in the documented order (fairness out of reach).
    cfg = config(
        max_num_seqs=1,
        max_num_batched_tokens=budget,
        policy=policy,
        fairness_steps=1000,
        enable_prefix_caching=False,
    )
    h = Harness(cfg, eos=NO_EOS)
    for i, (priority, n) in enumerate(jobs):
        h.add(f"r{i}", [(7 * i + k) % VOCAB for k in range(n)], priority=priority, max_tokens=1)
    h.run()

    def key(i: int) -> tuple[int, ...]:
        priority, n = jobs[i]
        return (priority, i) if policy == "fcfs" else (priority, n, i)

    assert first_served(h) == [f"r{i}" for i in sorted(range(len(jobs)), key=key)]
