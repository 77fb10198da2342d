"""Validation: SchedulerConfig, SamplingParams, what `Scheduler.add` refuses; finish reasons."""

from __future__ import annotations

import math

import pytest

from packserve.scheduler import Request, RequestStatus, RunnerOutput, SamplingParams, Scheduler

from .harness import config
from .reference import EOS


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
        {"max_model_len": 0},
        {"block_size": 0},
        {"max_num_seqs": 0},
        {"max_model_len": 33, "num_kv_blocks": 2},  # pool < one sequence
        {"max_model_len": 64, "num_kv_blocks": 3},
        {"max_num_seqs": 9, "max_num_batched_tokens": 8},  # no room for a decode each
        {"max_prefill_row_len": -1},
        {"prefill_mode": "ragged"},
        {"prefill_mode": "padded", "mix_decodes": True},
        {"policy": "lifo"},
        {"fairness_steps": 0},
        {"chunk_align": 8},  # not a multiple of the block size
        {"chunk_align": -16},
        {"chunk_align": 32, "max_num_batched_tokens": 39},  # a chunk and 8 decodes: 40
        {"chunk_align": 32, "max_prefill_row_len": 16},  # a row must hold a chunk
        {"chunk_align": 32, "max_prefill_tokens_while_decoding": 31},
        {"max_prefill_tokens_while_decoding": 0},
    ],
)
def test_config_rejects_invalid_values(kw):
    with pytest.raises(ValueError):
        config(**({"max_model_len": 32, "num_kv_blocks": 4, "block_size": 16} | kw))


def test_config_accepts_boundary_values():
    config(max_model_len=32, num_kv_blocks=4, block_size=16)  # the invalid cases' base
    cfg = config(max_model_len=32, num_kv_blocks=2, block_size=16, max_num_batched_tokens=8)
    assert cfg.row_capacity == 8  # 0: the step budget; no longer tied to max_model_len
    wide = config(max_model_len=32, num_kv_blocks=2, block_size=16, max_prefill_row_len=48)
    assert wide.row_capacity == 48
    narrow = config(max_num_batched_tokens=64, max_prefill_row_len=100)
    assert narrow.row_capacity == 64  # never wider than the step
    config(max_model_len=8, num_kv_blocks=1, block_size=8, prefill_mode="padded")
    config(
        block_size=16,
        chunk_align=32,
        max_num_seqs=8,
        max_num_batched_tokens=40,
        max_prefill_row_len=32,
        max_prefill_tokens_while_decoding=32,
    )


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
