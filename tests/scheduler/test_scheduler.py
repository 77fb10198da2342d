"""The scheduler driven step by step through `harness.Harness`: a hand-built runner that
keeps its state from the step deltas, and checks of every step against the state before it.
Admission, rows, continuous batching, stop rules and the step payload; preemption and aborts,
chunked prefill, the prefix cache, the policies, validation and the random-workload properties
have files of their own."""

from __future__ import annotations

import dataclasses

import pytest

from packserve.scheduler import (
    Request,
    RequestStatus,
    RunnerOutput,
    SamplingParams,
    Scheduler,
    TokenLogprobs,
)

from .harness import (
    Harness,
    config,
    ids,
    preemption_workload,
    prompt,
    row_ids,
    row_lens,
    scripted,
)
from .kv_runner import KVRunner
from .reference import EOS, NO_EOS, next_token, reference

# -- admission ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "shortest-first"])
def test_admission_in_arrival_order_when_prompts_are_equal(policy):
    h = Harness(config(max_num_seqs=2, policy=policy), eos=NO_EOS)
    for i, n in enumerate([1, 5, 5, 5]):
        h.add("abcd"[i], prompt(i, 3), max_tokens=n)
    out, _ = h.step()
    assert sorted(s.request_id for s in out.prefills) == ["a", "b"]
    assert sorted(ids(h.sched.waiting)) == ["c", "d"]
    out, _ = h.step()  # a finished after one token: its seat goes to c, not d
    assert [s.request_id for s in out.prefills] == ["c"]
    assert [s.request_id for s in out.decodes] == ["b"]
    assert ids(h.sched.waiting) == ["d"]
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


@pytest.mark.parametrize("caching", [False, True])
def test_prompt_waits_until_blocks_for_its_whole_prefill_are_free(caching):
    # 8 blocks of 4: a (20 tokens, 5 blocks, 6 once it decodes) leaves no room for b's 4.
    cfg = config(num_kv_blocks=8, block_size=4, enable_prefix_caching=caching, policy="fcfs")
    h = Harness(cfg, eos=NO_EOS)
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
    assert h.sched.allocator.num_free == 8  # a's blocks are free (cached ones among them)
    out, _ = h.step()
    assert [(s.request_id, s.start_pos, s.num_tokens) for s in out.prefills] == [("b", 0, 16)]
    h.run()


def test_admission_leaves_the_blocks_running_prefills_were_promised():
    # 8 blocks of 2, a budget of 4: a (12 tokens, 6 blocks) is admitted with its first piece
    # of 4 tokens; b (6 tokens, 3 blocks; the shorter, so first in line) would fit the 6 free
    # blocks, but a's prefill needs 4 more of them.
    cfg = config(
        max_model_len=16,
        num_kv_blocks=8,
        block_size=2,
        max_num_seqs=2,
        max_num_batched_tokens=4,
        enable_prefix_caching=False,
    )
    h = Harness(cfg, eos=NO_EOS)
    h.add("a", prompt(1, 12), max_tokens=1)
    out, _ = h.step()
    assert [(s.request_id, s.num_tokens) for s in out.prefills] == [("a", 4)]
    h.add("b", prompt(2, 6), max_tokens=1)
    out, _ = h.step()  # a's second piece
    assert [(s.request_id, s.num_tokens) for s in out.prefills] == [("a", 4)]
    assert ids(h.sched.waiting) == ["b"] and h.sched.allocator.num_free == 4
    h.run()


def test_empty_scheduler_step():
    sched = Scheduler(config(), frozenset({EOS}))
    out = sched.schedule()
    assert out.is_empty and not out.preempted_ids and out.segments == ()
    assert out.num_tokens == 0 and out.num_cache_query_tokens == 0
    assert sched.update(out, RunnerOutput({}, {})) == []
    assert not sched.has_unfinished


# -- rows -----------------------------------------------------------------------------------


def test_packed_rows_are_first_fit_decreasing():
    cfg = config(max_model_len=16, max_num_batched_tokens=64, max_prefill_row_len=16)
    h = Harness(cfg, eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=1)
    out, _ = h.step()
    # Capacity 16: 9 | 8 | 7 joins 9 | 5 joins 8 | 3 joins 8+5.
    assert row_ids(out) == [["p0", "p2"], ["p1", "p3", "p4"]]
    assert row_lens(out) == [16, 16]
    h.run()


def test_rows_default_to_the_step_budget():
    # max_prefill_row_len=0: a row may hold the whole budget, so the five prompts share one
    # row of 32 tokens (1 x 32 costs less than FFD at 9 or 18).
    cfg = config(max_model_len=16, max_num_batched_tokens=64)
    assert cfg.row_capacity == 64
    h = Harness(cfg, eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=1)
    out, _ = h.step()
    assert len(out.rows) == 1 and row_lens(out) == [32]
    h.run()


def test_padded_mode_one_segment_per_row_and_decodes_apart():
    cfg = config(max_model_len=16, max_num_batched_tokens=64, prefill_mode="padded")
    assert not cfg.mix_decodes
    h = Harness(cfg, eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=2)
    out, _ = h.step()
    assert sorted(row_ids(out)) == [[f"p{i}"] for i in range(5)]
    assert max(row_lens(out)) * len(out.rows) == 5 * 9  # rows padded to the longest
    out, _ = h.step()
    assert out.rows == () and sorted(s.request_id for s in out.decode_batch) == [
        f"p{i}" for i in range(5)
    ]
    h.run()


@pytest.mark.parametrize("mix", [True, False])
def test_decodes_join_the_packed_rows_only_when_mixed(mix):
    h = Harness(config(mix_decodes=mix), eos=NO_EOS)
    h.add("a", prompt(1, 6), max_tokens=4)
    h.step()
    h.add("b", prompt(2, 5), max_tokens=4)
    out, _ = h.step()
    assert [s.request_id for s in out.decodes] == ["a"]
    if mix:  # one forward: a's decode token packed FFD with b's prompt
        assert out.decode_batch == () and row_ids(out) == [["b", "a"]]
    else:  # b's prompt in the rows, a's decode token in a forward of its own
        assert row_ids(out) == [["b"]] and [s.request_id for s in out.decode_batch] == ["a"]
    assert out.num_tokens == 6
    h.run()


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


@pytest.mark.parametrize("budget", [8, 48])
def test_outputs_match_reference_generation(budget):
    h = Harness(config(max_model_len=40, max_num_seqs=4, max_num_batched_tokens=budget))
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


# -- the step payload: what the runner is sent -----------------------------------------------


def payload_size(value: object) -> int:
    """Values a step carries: every id, count, flag, token and block id; a request's
    SamplingParams count as one (sent once, by reference)."""
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
    # A decode is its id, one token, its position, at most one new block and two flags, at
    # any context.
    assert max(payload_size(seq) for seq in decodes) <= 6
    # So a request costs the step payloads O(its length), not O(length^2) as when every step
    # sent each request's tokens, block table and outputs again.
    total = sum(payload_size(out) for out in h.history)
    assert total <= 3 * 7 * (prompt_len + max_tokens)


def test_runner_drops_the_state_of_ended_and_preempted_requests():
    # A, B, C: 3-token prompts, 2 blocks of 2 each
    h = preemption_workload(num_kv_blocks=6, enable_prefix_caching=False)
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
