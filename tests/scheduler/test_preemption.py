"""Preemption (victims by (priority, admission), recompute or replay) and aborts (waiting,
running, between chunks, while a step runs), driven through `harness.Harness`."""

from __future__ import annotations

import pytest

from packserve.scheduler import RequestStatus

from .harness import Harness, all_token_ids, config, ids, preemption_workload, prompt
from .reference import NO_EOS, VOCAB, reference

# -- preemption -------------------------------------------------------------------------------


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_evicts_the_latest_and_recomputes(caching):
    h = preemption_workload(num_kv_blocks=6, enable_prefix_caching=caching)
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
        known = h.requests[rid].prompt_token_ids + outputs
        # Recomputed from scratch, or after the blocks it registered before if still cached.
        assert list(seq.token_ids) == known[seq.start_pos :]
        assert seq.start_pos == 0 or caching
        assert list(sent.output_token_ids) == outputs
    assert h.sched.num_preemptions_total >= 2

    big = preemption_workload(num_kv_blocks=1000)
    big.run()
    assert big.sched.num_preemptions_total == 0
    for rid in "ABC":
        assert h.tokens(rid) == big.tokens(rid)
        assert h.reasons[rid] == big.reasons[rid] == "length"
        sp = h.requests[rid].params
        assert h.tokens(rid) == reference(h.requests[rid].prompt_token_ids, sp, (), 12)[0]


@pytest.mark.parametrize("caching", [False, True])
def test_replay_after_preemption_feeds_known_tokens_back_one_per_step(caching):
    h = preemption_workload(num_kv_blocks=6, replay_preempted=True, enable_prefix_caching=caching)
    h.run()  # the harness checks each step, and that replayed tokens sample nothing
    assert h.sched.num_preemptions_total >= 2
    replayed = 0
    for rid, request in h.requests.items():
        final = all_token_ids(request)
        expected_pos = None
        for out in h.history:
            for seq in out.prefills:
                if seq.request_id == rid:  # the prompt alone, first time or after preemption
                    assert list(seq.token_ids) == request.prompt_token_ids[seq.start_pos :]
                    expected_pos = len(request.prompt_token_ids)
            for seq in out.decodes:
                if seq.request_id == rid:  # the next position, with the token known there
                    assert seq.start_pos == expected_pos
                    assert seq.token_ids == (final[seq.start_pos],)
                    expected_pos += 1
                    replayed += not seq.sample
            if rid in out.preempted_ids:
                expected_pos = None
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
    out, _ = h.step()  # B needs 2 blocks (one of them its cached first), A still holds one
    assert not out.prefills and h.reasons == {"A": "length"}
    out, _ = h.step()  # B's first block was cached: only its fifth token is computed
    assert [(s.start_pos, s.token_ids) for s in out.prefills] == [(4, tuple(b_out))]
    assert out.num_cache_hit_tokens == 4
    h.run()
    sp = h.requests["B"].params
    assert h.tokens("B") == reference(prompt(2, 4), sp, (), 8)[0]


@pytest.mark.parametrize(
    ("policy", "readmission"),
    # fcfs: arrival order; shortest-first: C and D recompute 2 tokens, B 3.
    [("fcfs", ["B", "C", "D"]), ("shortest-first", ["C", "D", "B"])],
)
def test_several_preemptions_in_one_step_take_the_latest_admitted_first(policy, readmission):
    # Block size 1: every decode needs a new block. Four 1-token prompts fill the pool of 4.
    cfg = config(
        max_model_len=4,
        num_kv_blocks=4,
        block_size=1,
        enable_prefix_caching=False,
        policy=policy,
    )
    h = Harness(cfg, eos=NO_EOS)
    for rid in "ABCD":
        h.add(rid, [ord(rid) % VOCAB], max_tokens=3)
    h.step()
    out, _ = h.step()  # A takes D's block, B takes C's
    assert out.preempted_ids == ("D", "C")
    assert [s.request_id for s in out.decodes] == ["A", "B"]
    assert sorted(ids(h.sched.waiting)) == ["C", "D"]
    out, _ = h.step()  # A needs another block: B goes
    assert out.preempted_ids == ("B",)
    assert sorted(ids(h.sched.waiting)) == ["B", "C", "D"]
    h.run()
    readmitted = [n.request_id for out in h.history[3:] for n in out.new_requests]
    assert list(dict.fromkeys(readmitted)) == readmission
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
    assert all("a" not in [s.request_id for s in o.segments] for o in h.history[2:])


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


def test_abort_a_prefill_between_chunks():
    h = Harness(config(max_num_batched_tokens=8, max_model_len=40), eos=NO_EOS)
    h.add("long", prompt(1, 30), max_tokens=2)
    out, events = h.step()
    assert [(s.request_id, s.num_tokens, s.sample) for s in out.prefills] == [("long", 8, False)]
    assert events == []
    assert h.abort("long")
    assert h.sched.allocator.num_used == 0
    h.add("next", prompt(2, 5), max_tokens=2)
    out, _ = h.step()
    assert out.finished_ids == ("long",) and [n.request_id for n in out.new_requests] == ["next"]
    h.run()
    assert "long" not in h.events


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
