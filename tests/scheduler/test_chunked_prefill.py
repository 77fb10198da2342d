"""Chunked prefill: one token budget per step for decodes and prefill pieces, a bound on the
prefill while streams decode, pieces cut where the step or a row ends (or at chunk_align
multiples, and only whole). Every step also goes through the harness's checks."""

from __future__ import annotations

import pytest

from .harness import Harness, config, ids, prompt
from .reference import NO_EOS, reference


def pieces(h: Harness, rid: str) -> list[tuple[int, int]]:
    """(start_pos, num_tokens) of each prefill piece a request ran, in order."""
    return [
        (seq.start_pos, seq.num_tokens)
        for out in h.history
        for seq in out.prefills
        if seq.request_id == rid
    ]


def served(out) -> list[tuple[str, int, int]]:
    """(request, start_pos, num_tokens) of a step's prefill pieces, by request."""
    return sorted((s.request_id, s.start_pos, s.num_tokens) for s in out.prefills)


def two_streams_and_two_prompts(policy: str) -> Harness:
    """x and y decode; then a 15-token prompt and a 1-token one arrive, in that order, into a
    budget of 16 (14 once x and y have their decode tokens)."""
    h = Harness(config(max_model_len=16, max_num_batched_tokens=16, policy=policy), eos=NO_EOS)
    h.add("x", [1], max_tokens=3)
    h.add("y", [2], max_tokens=3)
    h.step()
    h.add("big", prompt(1, 15), max_tokens=1)
    h.add("small", [3], max_tokens=1)
    return h


def test_fcfs_serves_the_head_first_and_chunks_it():
    h = two_streams_and_two_prompts("fcfs")
    out, _ = h.step()
    assert served(out) == [("big", 0, 14)] and out.num_tokens == 16
    assert [s.request_id for s in out.decodes] == ["x", "y"]
    assert ids(h.sched.waiting) == ["small"]  # nothing left of the budget
    out, _ = h.step()  # big's last token first (arrival order), then small
    assert served(out) == [("big", 14, 1), ("small", 0, 1)]
    h.run()


def test_shortest_first_serves_the_short_prompt_first():
    h = two_streams_and_two_prompts("shortest-first")
    out, _ = h.step()
    assert served(out) == [("big", 0, 13), ("small", 0, 1)] and out.num_tokens == 16
    out, _ = h.step()
    assert served(out) == [("big", 13, 2)]
    h.run()


def test_the_budget_is_filled_with_pieces():
    h = Harness(config(max_num_batched_tokens=32, policy="fcfs"), eos=NO_EOS)
    for i in range(6):
        h.add(f"r{i}", prompt(i, 10), max_tokens=4)
    out, _ = h.step()  # 3 prompts whole, the fourth cut where the budget ends
    assert served(out) == [("r0", 0, 10), ("r1", 0, 10), ("r2", 0, 10), ("r3", 0, 2)]
    assert [s.sample for s in out.prefills if s.request_id == "r3"] == [False]
    out, _ = h.step()  # 3 decodes, the rest of r3 and the last two prompts: 31 of 32
    assert served(out) == [("r3", 2, 8), ("r4", 0, 10), ("r5", 0, 10)]
    assert out.num_tokens == 31
    h.run()
    for i in range(6):
        assert h.tokens(f"r{i}") == reference(prompt(i, 10), h.requests[f"r{i}"].params, (), 32)[0]


def test_streams_keep_decoding_while_a_long_prompt_is_chunked():
    cfg = config(max_model_len=64, max_num_batched_tokens=16, num_kv_blocks=64)
    h = Harness(cfg, eos=NO_EOS)
    for i in range(3):
        h.add(f"s{i}", prompt(i, 2), max_tokens=20)
    h.step()
    h.add("long", prompt(5, 40), max_tokens=2)
    while "long" not in h.reasons:
        out, _ = h.step()  # every stream gets its token in every step
        assert {s.request_id for s in out.decodes} >= {"s0", "s1", "s2"}
        assert out.num_tokens <= 16
    assert pieces(h, "long") == [(0, 13), (13, 13), (26, 13), (39, 1)]
    # Only the last piece samples: the first token comes with it.
    samples = [s.sample for out in h.history for s in out.prefills if s.request_id == "long"]
    assert samples == [False, False, False, True]
    h.run()
    assert h.tokens("long") == reference(prompt(5, 40), h.requests["long"].params, (), 64)[0]


def test_prefill_is_bounded_while_streams_decode():
    cfg = config(max_model_len=64, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8)
    h = Harness(cfg, eos=NO_EOS)
    for i in range(7):
        h.add(f"a{i}", [1 + i], max_tokens=6)
    h.step()
    h.add("long", prompt(5, 30), max_tokens=1)
    h.run()
    # Seven streams decode in every step long is prefilled: 8 prefill tokens a step (one
    # prompt waits for prefill), not the 57 left.
    assert pieces(h, "long") == [(0, 8), (8, 8), (16, 8), (24, 6)]
    h.add("idle", prompt(6, 40), max_tokens=1)
    out, _ = h.step()  # nothing decodes: the whole budget is the prefill's
    assert served(out) == [("idle", 0, 40)]
    h.run()


def test_row_capacity_cuts_pieces():
    cfg = config(max_model_len=64, max_num_batched_tokens=64, max_prefill_row_len=5)
    h = Harness(cfg, eos=NO_EOS)
    h.add("long", prompt(1, 12), max_tokens=1)
    h.add("short", prompt(2, 3), max_tokens=1)
    out, _ = h.step()  # a piece at most a row; one piece a request a step
    assert served(out) == [("long", 0, 5), ("short", 0, 3)]
    h.run()
    assert pieces(h, "long") == [(0, 5), (5, 5), (10, 2)]


@pytest.mark.parametrize("align", [0, 8])
def test_chunk_align_cuts_at_multiples_and_schedules_only_whole_chunks(align):
    cfg = config(
        max_model_len=40,
        block_size=4,
        chunk_align=align,
        max_num_batched_tokens=13,
        max_num_seqs=3,
    )
    h = Harness(cfg, eos=NO_EOS)
    h.add("a", [1], max_tokens=30)
    h.step()
    h.add("b", prompt(2, 21), max_tokens=1)
    h.add("d", prompt(3, 6), max_tokens=1)
    out, _ = h.step()  # a's decode, d whole (the shorter): 6 tokens of room left
    if align:  # b's first chunk is 8 tokens: it waits rather than run 6
        assert served(out) == [("d", 0, 6)] and out.num_tokens == 7
        assert ids(h.sched.waiting) == ["b"]
    else:
        assert served(out) == [("b", 0, 6), ("d", 0, 6)]
    h.run()
    if align:  # at multiples of 8, and the prompt's end
        assert pieces(h, "b") == [(0, 8), (8, 8), (16, 5)]
    else:
        assert pieces(h, "b") == [(0, 6), (6, 12), (18, 3)]
    assert h.tokens("b") == reference(prompt(2, 21), h.requests["b"].params, (), 40)[0]


def test_a_burst_of_prompts_gets_a_bounded_prefill_each_while_streams_decode():
    cfg = config(
        max_model_len=64,
        max_num_batched_tokens=64,
        max_prefill_tokens_while_decoding=8,
        max_num_seqs=16,
    )
    h = Harness(cfg, eos=NO_EOS)
    h.add("a", [1], max_tokens=6)
    h.step()
    for i, name in enumerate(("x", "y", "z")):
        h.add(name, prompt(5 + i, 30), max_tokens=1)
    out, _ = h.step()
    # One stream, three prompts waiting: 8 prefill tokens each, 24 in all, not 8.
    assert [s.request_id for s in out.decodes] == ["a"]
    assert sum(s.num_tokens for s in out.prefills) == 3 * 8
    h.run()
    h.add("b", [2], max_tokens=8)
    h.step()
    for i in range(12):
        h.add(f"p{i}", prompt(10 + i, 30), max_tokens=1)
    out, _ = h.step()
    # Twelve prompts and one stream: 8 x 12 = 96 allowed, so the budget's 63 left bound it.
    assert [s.request_id for s in out.decodes] == ["b"]
    assert sum(s.num_tokens for s in out.prefills) == 63
    h.run()


def test_waiting_prompts_without_a_seat_do_not_widen_the_prefill_bound():
    cfg = config(
        max_model_len=64,
        max_num_batched_tokens=64,
        max_prefill_tokens_while_decoding=8,
        max_num_seqs=2,
    )
    h = Harness(cfg, eos=NO_EOS)
    h.add("a", [1], max_tokens=8)
    h.step()
    for i, name in enumerate(("long", "x", "y", "z")):  # one seat left: one is served
        h.add(name, prompt(5 + i, 30 - i), max_tokens=1)
    out, _ = h.step()
    assert [s.num_tokens for s in out.prefills] == [8]
    h.run()
