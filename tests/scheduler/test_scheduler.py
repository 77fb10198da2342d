"""The scheduler driven step by step through `harness.Harness`: a hand-built runner that
keeps its state from the step deltas, and checks of every step against the state before it."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, event, given, settings

from packserve.scheduler import (
    Request,
    RequestStatus,
    RunnerOutput,
    SamplingParams,
    Scheduler,
    SchedulerOutput,
    TokenLogprobs,
)

from .harness import (
    EOS,
    NO_EOS,
    VOCAB,
    Harness,
    KVRunner,
    all_token_ids,
    config,
    ids,
    next_token,
    num_prefill_tokens,
    prompt,
    reference,
    scripted,
    workloads,
)


def row_lens(out: SchedulerOutput) -> list[int]:
    """Real tokens in each prefill row."""
    return [sum(seq.num_tokens for seq in row) for row in out.prefill_bins]


# -- admission ------------------------------------------------------------------------------


def test_fcfs_admission():
    h = Harness(config(max_num_seqs=2), eos=NO_EOS)
    for i, n in enumerate([1, 5, 5, 5]):
        h.add("abcd"[i], prompt(i, 3), max_tokens=n)
    out, _ = h.step()
    assert sorted(s.request_id for s in out.prefills) == ["a", "b"]
    assert ids(h.sched.waiting) == ["c", "d"]
    out, _ = h.step()  # a finished after one token: its seat goes to c, not d
    assert [s.request_id for s in out.prefills] == ["c"]
    assert [s.request_id for s in out.decodes] == ["b"]
    assert ids(h.sched.waiting) == ["d"]
    h.run()


def test_later_short_prompt_does_not_overtake():
    h = Harness(config(max_model_len=16, max_num_batched_tokens=16), eos=NO_EOS)
    h.add("x", [1], max_tokens=3)
    h.add("y", [2], max_tokens=3)
    h.step()
    h.add("big", prompt(1, 15), max_tokens=1)  # 15 > 16 - 2 decode tokens
    h.add("small", [3], max_tokens=1)  # fits the budget, but arrived later
    for _ in range(2):
        out, _ = h.step()
        assert not out.prefills
        assert ids(h.sched.waiting) == ["big", "small"]
    out, _ = h.step()  # x and y are done: 15 + 1 tokens fit the budget of 16
    assert sorted(s.request_id for s in out.prefills) == ["big", "small"]
    h.run()


def test_token_budget_limits_admission():
    h = Harness(config(max_model_len=32, max_num_batched_tokens=32), eos=NO_EOS)
    for i in range(6):
        h.add(f"r{i}", prompt(i, 10), max_tokens=4)
    admitted = []
    for _ in range(3):
        out, _ = h.step()
        admitted.append(len(out.prefills))
        assert num_prefill_tokens(out) + len(out.decodes) <= 32
    # 3 x 10 <= 32; then 3 decodes leave 29 for 2 more; then 5 decodes leave 27 for the last.
    assert admitted == [3, 2, 1]
    h.run()


def test_max_num_seqs_caps_running():
    h = Harness(config(max_num_seqs=3), eos=NO_EOS)
    for i in range(7):
        h.add(f"r{i}", prompt(i, 2), max_tokens=2 + i)
    out, _ = h.step()
    assert len(out.prefills) == 3 and h.sched.num_waiting == 4
    peak = 0
    while h.sched.has_unfinished:
        out, _ = h.step()
        peak = max(peak, len(out.prefills) + len(out.decodes))
    assert peak == 3
    h.check_drained()


def test_prompt_waits_until_enough_blocks_are_free():
    # 8 blocks of 4: a (20 tokens, 5 blocks, 6 once it decodes) leaves no room for b's 4.
    h = Harness(config(max_model_len=32, num_kv_blocks=8, block_size=4), eos=NO_EOS)
    h.add("a", prompt(1, 20), max_tokens=3)
    h.add("b", prompt(2, 16), max_tokens=2)
    for _ in range(2):
        out, _ = h.step()
        assert [s.request_id for s in out.prefills] in (["a"], [])
        assert ids(h.sched.waiting) == ["b"]
        assert h.sched.allocator.num_free < 4
    out, _ = h.step()  # a's third and last token; b still could not have been admitted
    assert not out.prefills and ids(h.sched.waiting) == ["b"]
    assert h.reasons == {"a": "length"}
    free_before = h.sched.allocator.num_free
    out, _ = h.step()
    assert free_before == 8
    assert [s.request_id for s in out.prefills] == ["b"]
    h.run()


def test_packed_rows_are_first_fit_decreasing():
    h = Harness(config(max_model_len=16, max_num_batched_tokens=64), eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=1)
    out, _ = h.step()
    # Capacity 16: 9 | 8 | 7 joins 9 | 5 joins 8 | 3 joins 8+5.
    assert [[s.request_id for s in row] for row in out.prefill_bins] == [
        ["p0", "p2"],
        ["p1", "p3", "p4"],
    ]
    assert row_lens(out) == [16, 16]
    h.run()


def test_wider_rows_hold_more_prompts():
    cfg = config(max_model_len=16, max_num_batched_tokens=64, max_prefill_row_len=32)
    h = Harness(cfg, eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=1)
    out, _ = h.step()
    assert len(out.prefill_bins) == 1 and row_lens(out) == [32]
    h.run()


def test_padded_mode_one_prompt_per_row():
    cfg = config(max_model_len=16, max_num_batched_tokens=64, prefill_mode="padded")
    h = Harness(cfg, eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=2)
    out, _ = h.step()
    assert [[s.request_id for s in row] for row in out.prefill_bins] == [
        [f"p{i}"] for i in range(5)
    ]
    assert max(row_lens(out)) * len(out.prefill_bins) == 5 * 9  # rows padded to the longest
    h.run()


def test_empty_scheduler_step():
    sched = Scheduler(config(), frozenset({EOS}))
    out = sched.schedule()
    assert out.is_empty and not out.preempted_ids
    assert sched.update(out, RunnerOutput({}, {})) == []
    assert not sched.has_unfinished


# -- continuous batching ----------------------------------------------------------------------


def test_new_request_joins_the_running_batch():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 4), max_tokens=6)
    h.step()
    h.step()
    h.add("b", prompt(2, 5), max_tokens=6)
    out, _ = h.step()  # step 3: b prefills while a decodes
    assert [s.request_id for s in out.prefills] == ["b"]
    assert [s.request_id for s in out.decodes] == ["a"]
    out, _ = h.step()  # step 4: b decodes right away
    assert [s.request_id for s in out.decodes] == ["a", "b"]
    h.step()
    out, events = h.step()  # step 6: a's sixth token
    assert {e.request_id: e.finish_reason for e in events} == {"a": "length", "b": None}
    assert h.sched.allocator.num_used == len(h.requests["b"].block_ids)
    out, _ = h.step()  # a left at once
    assert [s.request_id for s in out.decodes] == ["b"] and not out.prefills
    h.run()
    assert len(h.tokens("a")) == 6 and len(h.tokens("b")) == 6


def test_request_finishing_at_prefill_never_decodes():
    h = Harness(config(), eos=NO_EOS)
    h.add("one", prompt(1, 5), max_tokens=1)
    h.add("many", prompt(2, 5), max_tokens=3)
    out, events = h.step()
    assert {e.request_id: e.finish_reason for e in events} == {"one": "length", "many": None}
    out, _ = h.step()
    assert [s.request_id for s in out.decodes] == ["many"]
    h.run()


# -- finish checks ----------------------------------------------------------------------------


def run_scripted(script: list[int], eos=frozenset({EOS}), max_model_len=32, plen=4, **params):
    p = prompt(3, plen)
    h = Harness(
        config(max_model_len=max_model_len),
        eos=eos,
        token_fn=scripted({"r": p}, {"r": script}),
    )
    h.add("r", p, **params)
    h.run()
    return h.tokens("r"), h.reasons["r"], h.events["r"]


def test_finish_on_max_tokens():
    tokens, reason, events = run_scripted([5, 6, 7, 8, 9], max_tokens=3)
    assert tokens == [5, 6, 7] and reason == "length"
    assert [e.finish_reason for e in events] == [None, None, "length"]


def test_finish_on_eos():
    tokens, reason, events = run_scripted([5, EOS, 7, 8], max_tokens=10)
    assert tokens == [5, EOS] and reason == "stop"
    assert [e.finish_reason for e in events] == [None, "stop"]


def test_eos_at_prefill():
    assert run_scripted([EOS, 7], max_tokens=10)[:2] == ([EOS], "stop")


def test_any_of_several_eos_ids_stops():
    assert run_scripted([5, 41, 7], eos=frozenset({EOS, 41}), max_tokens=10)[:2] == (
        [5, 41],
        "stop",
    )


def test_ignore_eos_keeps_going():
    tokens, reason, _ = run_scripted([5, EOS, 7, EOS], max_tokens=4, ignore_eos=True)
    assert tokens == [5, EOS, 7, EOS] and reason == "length"


def test_finish_on_stop_token_ids():
    tokens, reason, _ = run_scripted([5, 9, 7], max_tokens=10, stop_token_ids=(9, 11))
    assert tokens == [5, 9] and reason == "stop"


def test_stop_token_ids_apply_despite_ignore_eos():
    tokens, reason, _ = run_scripted(
        [EOS, 11, 7], max_tokens=10, stop_token_ids=(11,), ignore_eos=True
    )
    assert tokens == [EOS, 11] and reason == "stop"


def test_eos_on_the_last_allowed_token_is_stop():
    assert run_scripted([5, EOS], max_tokens=2)[:2] == ([5, EOS], "stop")


def test_finish_on_max_model_len():
    tokens, reason, _ = run_scripted([1] * 20, max_model_len=8, plen=5, max_tokens=100)
    assert tokens == [1, 1, 1] and reason == "length"


def test_longest_prompt_gets_one_token():
    tokens, reason, _ = run_scripted([1] * 5, max_model_len=8, plen=7, max_tokens=100)
    assert tokens == [1] and reason == "length"


def test_logprobs_are_passed_through():
    h = Harness(config(), eos=NO_EOS)
    h.add("with", prompt(1, 3), max_tokens=2, logprobs=1)
    h.add("without", prompt(2, 3), max_tokens=2)
    lp = TokenLogprobs(logprob=-0.5, top=((3, -0.5), (4, -1.5)))
    h.runner.logprobs = {"with": lp}
    h.run()
    assert [e.logprobs for e in h.events["with"]] == [(lp,), (lp,)]
    assert [e.logprobs for e in h.events["without"]] == [(), ()]


# -- outputs match the reference ----------------------------------------------------------------


def test_outputs_match_reference_generation():
    h = Harness(config(max_model_len=40, max_num_seqs=4, max_num_batched_tokens=48))
    params = {}
    for i in range(10):
        kw = {"max_tokens": 5 + 3 * i, "ignore_eos": i % 3 == 0}
        if i % 4 == 1:
            kw["stop_token_ids"] = (next_token(prompt(i, 3 + i)),)  # stops at its first token
        params[f"r{i}"] = kw
        h.add(f"r{i}", prompt(i, 3 + i), **kw)
    h.run()
    for i in range(10):
        rid = f"r{i}"
        sp = SamplingParams(**params[rid])
        expected = reference(prompt(i, 3 + i), sp, {EOS}, 40)
        assert (h.tokens(rid), h.reasons[rid]) == expected


# -- preemption -------------------------------------------------------------------------------


def preemption_workload(num_kv_blocks: int) -> Harness:
    cfg = config(max_model_len=12, num_kv_blocks=num_kv_blocks, block_size=2)
    h = Harness(cfg, eos=NO_EOS)
    for i, rid in enumerate("ABC"):
        h.add(rid, prompt(i + 1, 3), max_tokens=6)
    return h


def test_preemption_evicts_the_latest_and_recomputes():
    h = preemption_workload(num_kv_blocks=6)
    h.step()  # A, B, C prefill: 2 blocks each, the pool is full
    h.step()  # 4 tokens each still fit 2 blocks
    c_outputs = h.tokens("C")
    out, _ = h.step()  # A needs a third block: C, the most recent, goes
    assert out.preempted_ids == ("C",)
    assert [s.request_id for s in out.decodes] == ["A", "B"]
    c = h.requests["C"]
    assert ids(h.sched.waiting) == ["C"]
    assert h.num_preemptions("C") == 1
    assert c.block_ids == [] and c.status == RequestStatus.WAITING
    assert h.tokens("C") == c_outputs and len(c_outputs) == 2  # generated tokens are kept

    preempted_at = {}
    reprefills = {}
    while h.sched.has_unfinished:
        outputs_before = {rid: h.tokens(rid) for rid in h.requests}
        out, _ = h.step()
        for rid in out.preempted_ids:
            preempted_at.setdefault(rid, outputs_before[rid])
        new = {n.request_id: n for n in out.new_requests}
        for seq in out.prefills:
            sent = (seq, new[seq.request_id], outputs_before[seq.request_id])
            reprefills.setdefault(seq.request_id, sent)
    h.check_drained()
    assert "B" in preempted_at  # later, A's growth pushes B out as well
    for rid in ("B", "C"):
        seq, sent, outputs = reprefills[rid]
        assert outputs, f"{rid} re-prefilled before generating anything"
        assert list(seq.token_ids) == h.requests[rid].prompt_token_ids + outputs
        assert list(sent.output_token_ids) == outputs
        assert seq.start_pos == 0
    assert h.sched.num_preemptions_total >= 2

    big = preemption_workload(num_kv_blocks=1000)
    big.run()
    assert big.sched.num_preemptions_total == 0
    for rid in "ABC":
        assert h.tokens(rid) == big.tokens(rid)
        assert h.reasons[rid] == big.reasons[rid] == "length"
        sp = h.requests[rid].params
        assert h.tokens(rid) == reference(h.requests[rid].prompt_token_ids, sp, (), 12)[0]


def test_replay_after_preemption_feeds_known_tokens_back_one_per_step():
    cfg = config(max_model_len=12, num_kv_blocks=6, block_size=2, replay_preempted=True)
    h = Harness(cfg, eos=NO_EOS)
    for i, rid in enumerate("ABC"):
        h.add(rid, prompt(i + 1, 3), max_tokens=6)
    h.run()  # the harness checks each step, and that replay steps emit nothing
    assert h.sched.num_preemptions_total >= 2
    replayed = 0
    for rid, request in h.requests.items():
        final = all_token_ids(request)
        expected_pos = None
        decodes = 0
        for out in h.history:
            for seq in out.prefills:
                if seq.request_id == rid:  # the prompt alone, first time or after preemption
                    assert list(seq.token_ids) == request.prompt_token_ids
                    expected_pos = len(request.prompt_token_ids)
            for seq in out.decodes:
                if seq.request_id == rid:  # the next position, with the token known there
                    assert seq.start_pos == expected_pos
                    assert seq.token_ids == (final[seq.start_pos],)
                    expected_pos += 1
                    decodes += 1
            if rid in out.preempted_ids:
                expected_pos = None
        # Without replay each decode yields one of the outputs after the first.
        replayed += decodes - (len(request.output_token_ids) - 1)
    assert replayed > 0
    big = preemption_workload(num_kv_blocks=1000)
    big.run()
    for rid in "ABC":
        assert h.tokens(rid) == big.tokens(rid) and h.reasons[rid] == "length"


def test_request_can_preempt_itself():
    # Two blocks of 4: A (1 token) and B (4 tokens) take one each; B's fifth token needs a
    # second block, and B is the most recent, so B is the one to go.
    cfg = config(max_model_len=8, num_kv_blocks=2, block_size=4, max_num_batched_tokens=8)
    h = Harness(cfg, eos=NO_EOS)
    h.add("A", [5], max_tokens=3)
    h.add("B", prompt(2, 4), max_tokens=3)
    h.step()
    b_out = h.tokens("B")
    out, _ = h.step()
    assert out.preempted_ids == ("B",)
    assert [s.request_id for s in out.decodes] == ["A"] and not out.prefills
    out, _ = h.step()  # B needs 2 blocks, A still holds one
    assert not out.prefills and h.reasons == {"A": "length"}
    out, _ = h.step()
    assert [s.token_ids for s in out.prefills] == [tuple(prompt(2, 4) + b_out)]
    h.run()
    sp = h.requests["B"].params
    assert h.tokens("B") == reference(prompt(2, 4), sp, (), 8)[0]


def test_several_preemptions_in_one_step_keep_admission_order():
    # Block size 1: every decode needs a new block. Four 1-token prompts fill the pool of 4.
    cfg = config(max_model_len=4, num_kv_blocks=4, block_size=1)
    h = Harness(cfg, eos=NO_EOS)
    for rid in "ABCD":
        h.add(rid, [ord(rid) % VOCAB], max_tokens=3)
    h.step()
    out, _ = h.step()  # A takes D's block, B takes C's
    assert out.preempted_ids == ("D", "C")
    assert [s.request_id for s in out.decodes] == ["A", "B"]
    assert ids(h.sched.waiting) == ["C", "D"]
    out, _ = h.step()  # A needs another block: B goes
    assert out.preempted_ids == ("B",)
    assert ids(h.sched.waiting) == ["B", "C", "D"]
    h.run()
    for rid in "ABCD":
        sp = h.requests[rid].params
        assert h.tokens(rid) == reference([ord(rid) % VOCAB], sp, (), 4)[0]


# -- aborts -----------------------------------------------------------------------------------


def test_abort_waiting_request():
    h = Harness(config(max_num_seqs=1), eos=NO_EOS)
    h.add("a", prompt(1, 3), max_tokens=4)
    h.add("b", prompt(2, 3), max_tokens=4)
    h.step()
    assert ids(h.sched.waiting) == ["b"]
    assert h.abort("b")
    assert h.sched.num_waiting == 0
    assert h.requests["b"].status.finish_reason == "abort"
    assert not h.abort("b") and not h.abort("never-added")
    h.run()
    assert "b" not in h.events
    assert h.requests["b"].output_token_ids == []


def test_abort_running_request_frees_its_blocks():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 9), max_tokens=8)
    h.add("b", prompt(2, 5), max_tokens=8)
    h.step()
    h.step()
    assert h.sched.allocator.num_used == len(h.requests["a"].block_ids) + len(
        h.requests["b"].block_ids
    )
    n_events = len(h.events["a"])
    assert h.abort("a")
    assert h.sched.allocator.num_used == len(h.requests["b"].block_ids)
    assert ids(h.sched.running) == ["b"]
    h.run()
    assert len(h.events["a"]) == n_events
    assert all(e.finish_reason is None for e in h.events["a"])
    assert all("a" not in [s.request_id for s in o.decodes] for o in h.history[2:])


def test_abort_while_the_step_runs():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 6), max_tokens=8)
    h.add("b", prompt(2, 6), max_tokens=8)
    h.step()
    out, events = h.step(abort_mid=["a"])
    assert "a" in [s.request_id for s in out.decodes]
    assert [e.request_id for e in events] == ["b"]
    assert h.requests["a"].block_ids == []
    h.run()
    assert len(h.events["a"]) == 1


def test_abort_preempted_request():
    cfg = config(max_model_len=8, num_kv_blocks=2, block_size=4, max_num_batched_tokens=8)
    h = Harness(cfg, eos=NO_EOS)
    h.add("A", [5], max_tokens=3)
    h.add("B", prompt(2, 4), max_tokens=3)
    h.step()
    out, _ = h.step()
    assert out.preempted_ids == ("B",)
    assert h.abort("B")
    assert h.sched.num_waiting == 0
    h.run()
    assert len(h.events["B"]) == 1


def test_finish_request_with_error_status():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 3), max_tokens=8)
    h.step()
    assert h.finish("a", RequestStatus.FINISHED_ERROR)
    assert h.requests["a"].status.finish_reason == "error"
    assert h.sched.allocator.num_used == 0 and not h.sched.has_unfinished


# -- the step payload: what the runner is sent -----------------------------------------------


def payload_size(value: object) -> int:
    """Values a step carries: every id, count, token and block id; a request's SamplingParams
    count as one (sent once, by reference)."""
    if isinstance(value, SamplingParams):
        return 1
    if dataclasses.is_dataclass(value):
        return sum(payload_size(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, tuple):
        return sum(payload_size(v) for v in value)
    return 1


@pytest.mark.parametrize("prompt_len", [4, 400])
def test_step_payload_does_not_grow_with_context(prompt_len):
    max_tokens = 300
    cfg = config(max_model_len=1024, num_kv_blocks=1024, max_num_batched_tokens=2048)
    h = Harness(cfg, eos=NO_EOS)
    for i in range(3):
        h.add(f"r{i}", prompt(i, prompt_len), max_tokens=max_tokens)
    h.run()  # the harness's runner rebuilds every block table and output list from the deltas
    decodes = [seq for out in h.history for seq in out.decodes]
    assert len(decodes) == 3 * (max_tokens - 1)
    # A decode is its id, one token, its position and at most one new block, at any context.
    assert max(payload_size(seq) for seq in decodes) <= 4
    # So a request costs the step payloads O(its length), not O(length^2) as when every step
    # sent each request's tokens, block table and outputs again.
    total = sum(payload_size(out) for out in h.history)
    assert total <= 3 * 5 * (prompt_len + max_tokens)


def test_runner_drops_the_state_of_ended_and_preempted_requests():
    h = preemption_workload(num_kv_blocks=6)  # A, B, C: 3-token prompts, 2 blocks of 2 each
    h.add("D", prompt(4, 3), max_tokens=6)
    h.step()  # A, B, C prefill and fill the pool; D waits
    assert set(h.runner.states) == {"A", "B", "C"}
    assert h.abort("D")  # never ran: the runner never held it
    out, _ = h.step()
    assert out.finished_ids == ("D",) and set(h.runner.states) == {"A", "B", "C"}
    out, _ = h.step()  # A needs a third block: C, the most recent, goes
    assert out.preempted_ids == ("C",) and set(h.runner.states) == {"A", "B"}
    assert h.finish("B", RequestStatus.FINISHED_STOPPED)  # as the engine does on a stop string
    out, _ = h.step(abort_mid=["A"])  # C comes back, whole; A is aborted while the step runs
    assert out.finished_ids == ("B",) and [n.request_id for n in out.new_requests] == ["C"]
    assert set(h.runner.states) == {"A", "C"}  # A ran in this step; the next one drops it
    out, _ = h.step()
    assert out.finished_ids == ("A",) and set(h.runner.states) == {"C"} == set(ids(h.sched.running))
    h.run()
    assert h.tokens("C") == reference(prompt(3, 3), h.requests["C"].params, (), 12)[0]


def test_ended_requests_are_reported_in_the_next_step_that_runs():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 3), max_tokens=1)
    h.step()  # a ends at its prefill
    out, _ = h.step()  # nothing to run: the engine skips such a step, so it reports nothing
    assert out.is_empty and out.finished_ids == ()
    h.add("b", prompt(2, 3), max_tokens=2)
    out, _ = h.step()
    assert out.finished_ids == ("a",) and set(h.runner.states) == {"b"}
    out, _ = h.step()
    assert out.finished_ids == ()
    h.run()


def test_an_id_may_end_and_be_admitted_again_in_one_step():
    cfg = config()
    sched = Scheduler(cfg, NO_EOS)
    runner = KVRunner(cfg)
    sched.add(Request("x", prompt(1, 3), SamplingParams(max_tokens=1)))
    out = sched.schedule()
    sched.update(out, runner(out))  # x ends at its prefill
    again = Request("x", prompt(2, 5), SamplingParams(max_tokens=3))
    sched.add(again)
    out = sched.schedule()
    assert out.finished_ids == ("x",) and [n.request_id for n in out.new_requests] == ["x"]
    while sched.has_unfinished:  # the runner dropped the old x before taking the new one
        sched.update(out, runner(out))
        out = sched.schedule()
    assert again.output_token_ids == reference(prompt(2, 5), again.params, (), 32)[0]


# -- random workloads ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_drain(workload):
    cfg, jobs = workload
    h = Harness(cfg)
    last_arrival = max(j.arrive for j in jobs)
    step = 0
    while step <= last_arrival or h.sched.has_unfinished:
        assert step < 5000, "did not drain"
        for j in jobs:
            if j.arrive == step:
                req = Request(j.rid, list(j.prompt), j.params)
                h.sched.add(req)
                h.requests[j.rid] = req
        mid = []
        for j in jobs:
            if j.abort and j.abort[0] == step and j.rid in h.sched.requests:
                if j.abort[1]:
                    mid.append(j.rid)
                else:
                    h.abort(j.rid)
        h.step(abort_mid=mid)
        step += 1
    h.check_drained()
    event(f"preemptions: {min(h.sched.num_preemptions_total, 3)}")
    event(f"aborted: {min(sum(r == 'abort' for r in h.reasons.values()), 2)}")
    for j in jobs:
        tokens, reason = reference(j.prompt, j.params, {EOS}, cfg.max_model_len)
        if h.reasons[j.rid] == "abort":
            assert h.tokens(j.rid) == tokens[: len(h.tokens(j.rid))]
            assert len(h.tokens(j.rid)) < len(tokens) or h.tokens(j.rid) == []
        else:
            assert (h.tokens(j.rid), h.reasons[j.rid]) == (tokens, reason)


# -- validation ---------------------------------------------------------------------------------


def test_add_rejects_duplicate_ids():
    sched = Scheduler(config(), frozenset({EOS}))
    sched.add(Request("x", [1, 2], SamplingParams()))
    with pytest.raises(ValueError):
        sched.add(Request("x", [3], SamplingParams()))
    assert sched.num_waiting == 1
    out = sched.schedule()
    sched.update(out, RunnerOutput({"x": 7}, {}))
    assert sched.num_running == 1
    with pytest.raises(ValueError):  # still a duplicate while it runs
        sched.add(Request("x", [3], SamplingParams()))
    assert sched.num_waiting == 0


def test_add_rejects_empty_prompt():
    sched = Scheduler(config(), frozenset({EOS}))
    with pytest.raises(ValueError):
        sched.add(Request("x", [], SamplingParams()))
    assert not sched.has_unfinished


@pytest.mark.parametrize("n", [8, 9, 100])
def test_add_rejects_prompts_that_leave_no_room(n):
    sched = Scheduler(config(max_model_len=8), frozenset({EOS}))
    with pytest.raises(ValueError):
        sched.add(Request("x", list(range(n)), SamplingParams()))
    assert not sched.has_unfinished
    sched.add(Request("y", list(range(7)), SamplingParams()))  # one short of the limit is fine
    assert sched.num_waiting == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"max_model_len": 0, "num_kv_blocks": 4},
        {"max_model_len": 8, "num_kv_blocks": 4, "block_size": 0},
        {"max_model_len": 8, "num_kv_blocks": 4, "max_num_seqs": 0},
        {"max_model_len": 33, "num_kv_blocks": 2, "block_size": 16},  # pool < one sequence
        {"max_model_len": 64, "num_kv_blocks": 3, "block_size": 16},
        {"max_model_len": 64, "num_kv_blocks": 8, "max_num_batched_tokens": 63},
        {"max_model_len": 64, "num_kv_blocks": 8, "max_prefill_row_len": 32},
        {"max_model_len": 64, "num_kv_blocks": 8, "prefill_mode": "ragged"},
    ],
)
def test_config_rejects_invalid_values(kw):
    with pytest.raises(ValueError):
        config(**({"block_size": 16} | kw))


def test_config_accepts_boundary_values():
    cfg = config(max_model_len=32, num_kv_blocks=2, block_size=16, max_num_batched_tokens=32)
    assert cfg.row_capacity == 32
    wide = config(max_model_len=32, num_kv_blocks=2, block_size=16, max_prefill_row_len=48)
    assert wide.row_capacity == 48
    config(max_model_len=8, num_kv_blocks=1, block_size=8, prefill_mode="padded")


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -0.5},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": math.nan},
        {"max_tokens": 0},
        {"top_k": -2},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.01},
        {"frequency_penalty": math.nan},
        {"logprobs": 21},
        {"logprobs": -1},
    ],
)
def test_sampling_params_reject_invalid_values(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_sampling_params_accept_boundary_values():
    sp = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        presence_penalty=2.0,
        frequency_penalty=-2.0,
        logprobs=0,
    )
    assert sp.greedy
    assert not SamplingParams(temperature=0.7, logprobs=20).greedy


def test_finish_reason_mapping():
    expected = {
        RequestStatus.WAITING: None,
        RequestStatus.RUNNING: None,
        RequestStatus.FINISHED_STOPPED: "stop",
        RequestStatus.FINISHED_LENGTH: "length",
        RequestStatus.FINISHED_ABORTED: "abort",
        RequestStatus.FINISHED_ERROR: "error",
    }
    assert set(expected) == set(RequestStatus)
    for status, reason in expected.items():
        assert status.finish_reason == reason
        assert status.is_finished == (reason is not None)
