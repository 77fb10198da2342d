"""The engine's published surface: EngineInfo, EngineLoad after every step, StepStats of the
step that ran, and Completion built from deltas. Real tiny model, offline."""

from __future__ import annotations

import pytest

from packserve import Engine, EngineConfig, SamplingParams
from packserve.engine import Completion, Delta


@pytest.fixture(scope="module")
def engine(make_engine) -> Engine:
    return make_engine(max_num_seqs=4, num_kv_blocks=64, max_model_len=256)


def test_info_states_the_engine_that_was_built(engine: Engine) -> None:
    info = engine.info
    assert info.max_model_len == 256
    assert info.vocab_size == engine.model.config.vocab_size
    assert info.num_kv_blocks == 64 and info.block_size == 8 and info.max_num_seqs == 4
    assert info.max_num_batched_tokens == 512  # the default budget; rows may span it
    assert info.row_capacity == 512 and info.prefill_mode == "packed"
    assert info.prefix_caching
    eos = engine.tokenizer.eos_token_id
    assert eos in info.eos_token_ids


def test_load_and_stats_follow_each_step(engine: Engine) -> None:
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = [[5] * 40, [6] * 20, [7] * 30, [8] * 10, [9] * 50]
    ids = [engine.add_request(p, params) for p in prompts]
    idle = engine.load()
    assert (idle.num_running, idle.num_waiting, idle.num_kv_blocks_used) == (0, 5, 0)

    engine.step()  # four seats: the four shortest prompts prefilled, the longest waits
    stats, load = engine.last_stats, engine.load()
    assert stats is not None
    assert sorted(n for row in stats.prefill_rows for n in row) == [10, 20, 30, 40]
    assert stats.num_prefill_tokens == 100 and stats.num_decode_tokens == 0
    assert stats.num_tokens == 100 and stats.num_prefill_segments == 4
    assert stats.num_padded_prefill_tokens == max(map(sum, stats.prefill_rows)) * len(
        stats.prefill_rows
    )
    assert stats.num_unpacked_prefill_tokens == 4 * 40
    assert stats.bin_fill == stats.num_prefill_tokens / stats.num_padded_prefill_tokens
    assert stats.num_sampled_tokens == 4 and stats.num_cache_hit_tokens == 0
    assert stats.num_cache_query_tokens == 100
    assert (load.num_running, load.num_waiting) == (4, 1)
    # admitted shortest first
    assert [r.request_id for r in load.running] == [ids[3], ids[1], ids[2], ids[0]]
    assert [r.num_prompt_tokens for r in load.running] == [10, 20, 30, 40]
    assert all(r.num_output_tokens == 1 for r in load.running)
    # the prompts' 40, 20, 30 and 10 tokens, in blocks of 8
    assert load.num_kv_blocks_used == 5 + 3 + 4 + 2
    assert load.kv_cache_usage == load.num_kv_blocks_used / 64

    engine.step()
    stats = engine.last_stats
    assert stats is not None and stats.num_decode_tokens == 4 and stats.num_prefill_tokens == 0
    assert stats.num_row_tokens == 4 and stats.bin_fill == 1.0  # decode tokens in the rows
    while engine.has_unfinished:
        engine.step()
    done = engine.load()
    assert (done.num_running, done.num_waiting, done.num_kv_blocks_used) == (0, 0, 0)
    assert done.running == ()


def test_abort_shows_in_the_next_load(engine: Engine) -> None:
    request_id = engine.add_request([5] * 20, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.load().num_running == 1
    assert engine.abort(request_id)
    assert engine.load().num_running == 0 and engine.load().num_kv_blocks_used == 0
    assert not engine.abort(request_id)  # already gone


def test_generate_accumulates_the_stream(engine: Engine) -> None:
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    prompts = ["The capital of France is", [11, 12, 13]]
    streamed: dict[str, Completion] = {}
    order = []
    for delta in engine.stream(prompts, params):
        if delta.request_id not in streamed:
            order.append(delta.request_id)
            streamed[delta.request_id] = Completion(delta.request_id, ())
        streamed[delta.request_id].add(delta)
    results = engine.generate(prompts, params)
    assert [c.prompt_token_ids for c in results] == [
        tuple(engine.tokenize(prompts[0])),
        (11, 12, 13),
    ]
    for got, want in zip(results, (streamed[i] for i in order), strict=True):
        assert got.token_ids == want.token_ids and len(got.token_ids) == 6
        assert got.text == want.text == engine.tokenizer.decode(got.token_ids)
        assert len(got.logprobs) == 6 and got.finish_reason == "length" and got.error is None


def test_completion_records_the_end_and_an_error() -> None:
    out = Completion("r", (1, 2))
    out.add(Delta("r", (5,), "a", None))
    out.add(Delta("r", (6, 7), "bc", None))
    assert (out.token_ids, out.text, out.finish_reason) == ([5, 6, 7], "abc", None)
    out.add(Delta("r", (), "", "error", error="boom"))
    assert (out.finish_reason, out.error, out.text) == ("error", "boom", "abc")


def test_default_config_is_the_default_model() -> None:
    assert EngineConfig().model is None  # resolved to SmolLM2 by the engine, not here


@pytest.mark.parametrize(
    "bad",
    [
        {"block_size": 0},
        {"max_num_seqs": 0},
        {"kv_cache_memory_mb": 0},
        {"num_kv_blocks": 0},
        {"max_model_len": -1},
        {"max_prefill_row_len": -1},
        {"packing_window_ms": -1.0},
        {"packing_window_ms": float("nan")},
        {"dtype": "float8"},
        {"attention_backend": "flash"},
        {"prefill_mode": "chunked"},
        {"batch_invariant": True, "attention_backend": "dense"},
    ],
)
def test_engine_config_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else "batch_invariant"):
        EngineConfig(**bad)
