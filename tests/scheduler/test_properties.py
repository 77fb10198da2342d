"""Issue 14's scheduler properties over random workloads (pure Python, hypothesis).

Any valid config (tiny KV pools that force preemption, small budgets that chunk prompts,
chunk_align on and off, prefix caching on and off, both policies, decodes mixed or apart,
packed or padded rows, replay after preemption) and jobs with shared and repeated prompts,
priorities, arrivals over the first steps and aborts (between steps and while a step runs).
`Harness.step` checks every step; what each property rests on:

1. Budget: a step's tokens (decodes + prefill pieces) <= max_num_batched_tokens, its prefill
   <= max_prefill_tokens_while_decoding when anything decodes, each row <= row_capacity
   (`_check_rows`, `check_schedule`).
2. Exactly once: each admission's segments start at its cache hit and continue where the last
   one ended (`next_pos`), so no position is computed twice or skipped; the runner reads every
   context back through the block tables and finds exactly the request's tokens, each slot
   computed after exactly the prefix before it; the generated tokens equal `reference`.
3. Shared blocks: reference counts equal the running requests that hold each block; a block
   handed out fresh is held by no one else and not in the cache index; nothing writes into a
   block another request holds or the index holds (`check_state`, `KVRunner`).
4. Hash chain: the index, found through the tests' own BLAKE2b chain of every known prefix,
   holds every registered block once, under one digest, and each such block holds exactly the
   K/V of the prefix the digest stands for; a hit's blocks are the index's blocks for the
   request's own prefix, and the longest ones usable (`check_state`, `check_schedule`).
5. Liveness: every job finishes or is aborted, within a bound of steps; the fairness bound has
   its own property in test_policy.py.
6. Cache accounting: hits <= queries, hits are multiples of the block size (of chunk_align
   when set), none with caching off; the repeated-prompt size is in test_prefix_cache.py.
7. Priority and victims: the decode phase's victims exactly as documented, later ones in
   decreasing (priority, admission); the policy order (priority first) up to the reasons a
   request may be passed over; no admission in a step that preempted.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings

from packserve.scheduler import Request, SchedulerConfig

from .harness import Harness
from .reference import EOS, reference
from .workloads import Job, workloads


def drive(cfg: SchedulerConfig, jobs: list[Job]) -> Harness:
    """Run the jobs: each added before its arrival step, aborted at its abort step (between
    steps, or while the step runs), until the scheduler drains."""
    h = Harness(cfg)
    last_arrival = max(j.arrive for j in jobs)
    work = sum(len(j.prompt) + j.params.max_tokens for j in jobs)
    step = 0
    while step <= last_arrival or h.sched.has_unfinished:
        # Liveness: every step with work left does some; the workload drains well within
        # twice its tokens (measured: within once, over thousands of examples).
        assert step <= last_arrival + 2 * work + 8, "did not drain"
        for j in jobs:
            if j.arrive == step:
                h.add_request(Request(j.rid, list(j.prompt), j.params, j.priority))
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
    return h


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_every_invariant(workload):
    cfg, jobs = workload
    h = drive(cfg, jobs)
    for j in jobs:
        tokens, reason = reference(j.prompt, j.params, {EOS}, cfg.max_model_len)
        if h.reasons[j.rid] == "abort":
            assert h.tokens(j.rid) == tokens[: len(h.tokens(j.rid))]
            assert len(h.tokens(j.rid)) < len(tokens) or h.tokens(j.rid) == []
        else:
            assert (h.tokens(j.rid), h.reasons[j.rid]) == (tokens, reason)
    segments = [seq for out in h.history for seq in out.segments]
    event(f"preemptions: {min(h.sched.num_preemptions_total, 3)}")
    event(f"aborted: {min(sum(r == 'abort' for r in h.reasons.values()), 2)}")
    event(f"prefix hits: {any(out.num_cache_hit_tokens for out in h.history)}")
    event(f"chunked: {any(not s.sample and not s.is_decode for s in segments)}")
    event(f"replayed: {any(not s.sample and s.is_decode for s in segments)}")
