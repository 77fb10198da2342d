"""The runner keeps each running request's state across steps, built from the scheduler's
deltas alone, and drops it when the request is preempted or ends: after every step it holds
exactly the requests of that step, with the scheduler's block tables and generated tokens."""

from __future__ import annotations

import pytest

from packserve.engine.engine import Engine
from packserve.scheduler import SamplingParams


def check_runner_follows_scheduler(engine: Engine, ended: set[str]) -> None:
    """After a step that ran: the runner holds the step's requests (those still running and
    those that ended in it), each with the scheduler's view of it."""
    running = {r.request_id: r for r in engine.scheduler.running}
    assert set(engine.runner.requests) == set(running) | ended
    for rid, request in running.items():
        state = engine.runner.requests[rid]
        assert state.params is request.params
        assert state.block_ids == request.block_ids
        assert state.output_token_ids == request.output_token_ids
        assert state.num_prompt_tokens == len(request.prompt_token_ids)


@pytest.mark.parametrize(
    "overrides",
    [pytest.param({}, id="recompute"), pytest.param({"batch_invariant": True}, id="replay")],
)
def test_runner_state_follows_the_scheduler(make_engine, mixed_workload, overrides):
    # 40 blocks of 16: long prompts fill the pool, so running requests are preempted (and,
    # in batch-invariant mode, replayed); two requests are aborted along the way.
    engine = make_engine(block_size=16, num_kv_blocks=40, max_model_len=512, **overrides)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, params) for p, _, _ in mixed_workload[:12]]
    aborts = {3: ids[1], 8: ids[6]}  # step -> request aborted after it
    num_steps = 0
    while engine.has_unfinished:
        last = engine.last_stats
        deltas = engine.step()
        num_steps += 1
        if engine.last_stats is not last:  # the step ran (a step with no work does not)
            ended = {d.request_id for d in deltas if d.finish_reason is not None}
            check_runner_follows_scheduler(engine, ended)
        if num_steps in aborts:
            engine.abort(aborts[num_steps])
    assert engine.scheduler.num_preemptions_total > 0
    # The next step that runs drops everything that ended before it.
    rid = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=2))
    engine.step()
    assert set(engine.runner.requests) == {rid}
