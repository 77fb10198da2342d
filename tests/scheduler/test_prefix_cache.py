"""Prefix caching: full blocks registered under chained digests once their K/V is complete,
reused by later admissions (the longest registered prefix, leaving the prefill's last token to
compute, in whole chunks with chunk_align), shared by reference count, evicted least recently
released first. The harness's runner checks that every block a hit reuses holds the K/V of
exactly the request's own prefix, and that nothing writes into a shared or registered block."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .harness import Harness, config, prompt
from .reference import NO_EOS, VOCAB, chain_digests, reference


def documented_hit(n: int, block_size: int, align: int) -> int:
    """Tokens a repeated prompt of n tokens finds cached: the largest multiple of the block
    size (of chunk_align when set) that leaves its last token to compute."""
    return (n - 1) // (align or block_size) * (align or block_size)


@settings(max_examples=60, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 8]),
    align_blocks=st.sampled_from([0, 1, 2]),
    n=st.integers(1, 39),
    budget_extra=st.integers(0, 40),
    max_tokens=st.integers(1, 6),
    caching=st.booleans(),
)
def test_a_repeated_prompt_finds_its_prefix_cached(
    block_size, align_blocks, n, budget_extra, max_tokens, caching
):
    align = align_blocks * block_size
    cfg = config(
        max_model_len=48,
        block_size=block_size,
        chunk_align=align,
        max_num_batched_tokens=8 + align + budget_extra,  # small ones chunk the prompt
        enable_prefix_caching=caching,
    )
    h = Harness(cfg, eos=NO_EOS)
    p = [(5 * i + 3) % VOCAB for i in range(n)]
    h.add("first", p, max_tokens=max_tokens)
    h.run()
    h.add("again", p, max_tokens=max_tokens)
    out, _ = h.step()
    hit = documented_hit(n, block_size, align) if caching else 0
    assert out.num_cache_hit_tokens == hit
    assert out.num_cache_query_tokens == (n if caching else 0)
    assert [(s.request_id, s.start_pos) for s in out.prefills] == [("again", hit)]
    h.run()
    assert {e.num_cached_tokens for e in h.events["first"]} == {0}
    assert {e.num_cached_tokens for e in h.events["again"]} == {hit}
    expected = reference(p, h.requests["first"].params, (), 48)[0]
    assert h.tokens("again") == h.tokens("first") == expected


def test_running_requests_share_cached_blocks():
    h = Harness(config(max_model_len=64), eos=NO_EOS)
    a_prompt = prompt(1, 20)
    a = h.add("A", a_prompt, max_tokens=10)
    h.step()  # A's 5 full blocks are registered once its prefill ran
    b = h.add("B", a_prompt[:16] + [1, 2, 3, 4, 5, 6], max_tokens=4)
    out, _ = h.step()
    assert [(s.request_id, s.start_pos) for s in out.prefills] == [("B", 16)]
    shared = a.block_ids[:4]
    assert b.block_ids[:4] == shared and not set(b.block_ids[4:]) & set(a.block_ids)
    alloc = h.sched.allocator
    assert [alloc.ref_counts[x] for x in shared] == [2, 2, 2, 2]
    while "B" not in h.reasons:
        h.step()
    assert [alloc.ref_counts[x] for x in shared] == [1, 1, 1, 1]  # A holds them still
    h.run()
    assert not any(alloc.ref_counts) and alloc.num_free == alloc.num_blocks
    # Free, but cached: a third request with A's prompt reuses A's very blocks.
    h.add("C", a_prompt, max_tokens=1)
    out, _ = h.step()
    assert out.num_cache_hit_tokens == 16 and list(out.new_requests[0].block_ids[:4]) == shared
    h.run()
    assert h.tokens("B") == reference(b.prompt_token_ids, b.params, (), 64)[0]


@pytest.mark.parametrize(("align", "hit"), [(0, 20), (8, 8)])
def test_a_chat_turn_reuses_the_previous_turns_blocks(align, hit):
    # Turn 1: a prompt of 10, 12 tokens generated (21 computed: 5 full blocks of 4). Turn 2
    # sends them all back with 2 more. Without chunk_align the decoded blocks are cached too;
    # with it only whole chunks computed by a prefill are (8 tokens of turn 1's prompt).
    cfg = config(max_model_len=64, block_size=4, chunk_align=align, max_num_batched_tokens=64)
    h = Harness(cfg, eos=NO_EOS)
    first = prompt(1, 10)
    h.add("turn1", first, max_tokens=12)
    h.run()
    second = first + h.tokens("turn1") + [5, 6]
    h.add("turn2", second, max_tokens=2)
    out, _ = h.step()
    assert (out.num_cache_hit_tokens, out.num_cache_query_tokens) == (hit, len(second))
    h.run()
    assert h.tokens("turn2") == reference(second, h.requests["turn2"].params, (), 64)[0]


def test_caching_off_never_hits():
    h = Harness(config(enable_prefix_caching=False), eos=NO_EOS)
    for rid in ("a", "b"):
        h.add(rid, prompt(1, 20), max_tokens=3)
        h.run()
    assert all(out.num_cache_hit_tokens == out.num_cache_query_tokens == 0 for out in h.history)
    assert h.sched.allocator.num_cached == 0
    assert {e.num_cached_tokens for e in h.events["b"]} == {0}


def test_eviction_takes_free_blocks_first_then_the_least_recently_released():
    # 8 blocks of 4. A and B (12 tokens, 3 blocks each) run one after the other and leave
    # their blocks cached; C (16 tokens) needs 4: the 2 never used, then A's (released before
    # B's), A's last blocks first: A keeps its first block, B all of its own.
    h = Harness(config(num_kv_blocks=8, block_size=4), eos=NO_EOS)
    a, b, c = prompt(1, 12), prompt(2, 12), prompt(3, 16)
    for rid, p in [("A", a), ("B", b), ("C", c)]:
        h.add(rid, p, max_tokens=1)
        h.run()
    tables = {n.request_id: list(n.block_ids) for out in h.history for n in out.new_requests}
    assert not set(tables["A"]) & set(tables["B"])
    assert tables["C"][2:] == tables["A"][1:][::-1]
    alloc = h.sched.allocator
    assert alloc.lookup(chain_digests(a, 4)) == tables["A"][:1]
    assert alloc.lookup(chain_digests(b, 4)) == tables["B"]
    assert alloc.lookup(chain_digests(c, 4)) == tables["C"]
    h.add("A2", a, max_tokens=1)
    out, _ = h.step()
    assert out.num_cache_hit_tokens == 4
    h.run()


def preempted_mid_prefill() -> Harness:
    """S decodes; L (10 tokens) is prefilled 2 tokens a step until the pool of 7 blocks runs
    out and L, the later admitted, preempts itself with 8 tokens computed (4 full blocks,
    registered) and no token generated; S finishes in that step and L is readmitted."""
    cfg = config(
        max_model_len=14, num_kv_blocks=7, block_size=2, max_num_seqs=2, max_num_batched_tokens=3
    )
    h = Harness(cfg, eos=NO_EOS)
    h.add("S", [5], max_tokens=6)
    h.step()
    h.add("L", prompt(1, 10), max_tokens=1)
    h.run()
    assert h.num_preemptions("L") == 1
    return h


def test_a_preempted_request_resumes_after_its_own_cached_blocks():
    h = preempted_mid_prefill()
    assert h.hits["L"] == [0, 8]
    pieces = [(s.start_pos, s.num_tokens) for out in h.history for s in out.prefills]
    assert pieces[-1] == (8, 2)  # readmitted: only what was not computed and cached
    assert h.tokens("L") == reference(prompt(1, 10), h.requests["L"].params, (), 14)[0]


def test_num_cached_tokens_is_the_first_admissions_hit():
    # Request.num_cached_tokens / TokenEvent.num_cached_tokens: "prompt tokens found in the
    # prefix cache at first admission" (usage's cached_tokens). L found none then; the 8 it
    # found when readmitted are tokens it computed itself.
    h = preempted_mid_prefill()
    assert h.hits["L"] == [0, 8]
    assert [e.num_cached_tokens for e in h.events["L"]] == [0]
    assert h.requests["L"].num_cached_tokens == 0
