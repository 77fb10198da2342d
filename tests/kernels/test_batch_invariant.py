"""Batch-invariant mode: a request's logits are bitwise the same whatever else runs.

Every assertion here is the mode's contract (bitwise equality between two runs on the same
machine), never a value that one CPU's rounding produces, so it holds on any CPU.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch

import packserve.kernels.runner as runner_module
from packserve.engine.engine import Engine, EngineConfig
from packserve.kernels.invariant import RowTiled, TabulatedRotary, TileRows
from packserve.scheduler import SamplingParams, ScheduledSequence

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


Rows = dict[str, list[tuple[int, torch.Tensor]]]


@contextmanager
def recorded_logits(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rows]:
    """Every logits row the runner samples from, per request id in step order, with the
    position it was computed at. The real sampler still runs; this keeps a copy of its input.
    The runner samples one row per sampling segment of the step, in `segments` order."""
    rows: Rows = {}
    sample = runner_module.sample
    execute = runner_module.Runner.execute
    step: list[ScheduledSequence] = []  # the segments of the step being executed

    def executing(runner, output, *args, **options):
        step[:] = [seq for seq in output.segments if seq.sample]
        return execute(runner, output, *args, **options)

    def recording(logits, requests, generator, **options):
        for row, seq in zip(logits, step, strict=True):
            rows.setdefault(seq.request_id, []).append((seq.end_pos - 1, row.clone()))
        return sample(logits, requests, generator, **options)

    with monkeypatch.context() as patch:
        patch.setattr(runner_module.Runner, "execute", executing)
        patch.setattr(runner_module, "sample", recording)
        yield rows


def run_together(engine: Engine, prompts: Sequence[list[int]], params: SamplingParams) -> list[str]:
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    assert engine.scheduler.allocator.num_used == 0
    return ids


def logits_alone(engine: Engine, prompts, params, monkeypatch) -> list[dict[int, torch.Tensor]]:
    """Each prompt run alone: its logits row at each position."""
    out = []
    for prompt in prompts:
        with recorded_logits(monkeypatch) as rows:
            (rid,) = run_together(engine, [prompt], params)
        out.append(dict(rows[rid]))
    return out


def assert_bitwise(alone: list[dict[int, torch.Tensor]], rows: Rows, ids: list[str]) -> None:
    """Every row computed for request i (a replay after preemption recomputes some) equals
    the prompt-alone row at the same position, bit for bit, and every position was reached."""
    for i, rid in enumerate(ids):
        assert {position for position, _ in rows[rid]} == set(alone[i])
        for position, row in rows[rid]:
            expected = alone[i][position]
            assert torch.equal(row, expected), (
                f"prompt {i} position {position}: logits differ from the prompt alone by up "
                f"to {(row - expected).abs().max().item():.3g}"
            )


def row_tile_invariant(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` gives each row of a [tile, in] input the same bits at every row
    position of the tile (rolled through all positions): the contract `RowTiled` relies on."""
    with torch.inference_mode():
        ref = module(x)
        return all(
            torch.equal(module(x.roll(shift, 0)).roll(-shift, 0), ref)
            for shift in range(1, x.shape[0])
        )


def random_prompts(vocab: int, count: int, max_len: int, seed: int) -> list[list[int]]:
    """`count` prompts whose lengths spread over 1..max_len (both ends included)."""
    rng = random.Random(seed)
    lengths = [1, max_len] + [rng.randint(1, max_len) for _ in range(count - 2)]
    return [[rng.randrange(16, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def invariant_engine(make_engine) -> Engine:
    return make_engine(batch_invariant=True)


@pytest.fixture(scope="module")
def prompts_128(invariant_engine) -> list[list[int]]:
    return random_prompts(invariant_engine.model.config.vocab_size, 128, 1000, seed=11)


@pytest.fixture(scope="module")
def alone_128(invariant_engine, prompts_128) -> list[dict[int, torch.Tensor]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return logits_alone(invariant_engine, prompts_128, GREEDY, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="packed"),
        pytest.param({"prefill_mode": "padded"}, id="padded"),
        # Small budgets: prompts over many steps, rows of every fill, decode batches of all sizes.
        pytest.param(
            {"max_num_seqs": 24, "max_num_batched_tokens": 1500, "max_model_len": 1024},
            id="small-budget",
        ),
    ],
)
def test_logits_batched_and_packed_equal_alone_bitwise(
    make_engine, prompts_128, alone_128, monkeypatch, overrides
):
    engine = make_engine(batch_invariant=True, **overrides)
    with recorded_logits(monkeypatch) as rows:
        ids = run_together(engine, prompts_128, GREEDY)
    assert_bitwise(alone_128, rows, ids)


@pytest.mark.slow
def test_logits_bitwise_under_preemption(make_engine, prompts_128, alone_128, monkeypatch):
    # 120 blocks of 16 tokens: long prompts fill the pool, so running sequences are preempted
    # and replayed; the replay must reproduce their K/V bit for bit.
    engine = make_engine(batch_invariant=True, block_size=16, num_kv_blocks=120, max_model_len=1024)
    chosen = list(range(0, 128, 4))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = logits_alone(engine, [prompts_128[i] for i in chosen], params, monkeypatch)
    readmitted: set[str] = set()  # re-admitted with generated tokens to replay
    execute = runner_module.Runner.execute

    def executing(runner, output, *args, **options):
        readmitted.update(new.request_id for new in output.new_requests if new.output_token_ids)
        return execute(runner, output, *args, **options)

    monkeypatch.setattr(runner_module.Runner, "execute", executing)
    with recorded_logits(monkeypatch) as rows:
        ids = run_together(engine, [prompts_128[i] for i in chosen], params)
    assert readmitted, "no sequence was preempted after generating tokens"
    # Replayed tokens sample nothing; every later token's logits depend on their K/V.
    assert_bitwise(alone, rows, ids)


@pytest.mark.slow
def test_logits_bitwise_through_prefix_hits(make_engine, monkeypatch):
    """Six prompts sharing a 600-token prefix, after a seventh warmed the prefix cache: each
    reuses its two whole 256-token chunks (chunks are aligned, so the cached K/V is what the
    prompt computes itself), and its logits equal the prompt run alone with caching off."""
    engine = make_engine(batch_invariant=True)
    cold = make_engine(batch_invariant=True, enable_prefix_caching=False)
    rng = random.Random(21)
    vocab = engine.model.config.vocab_size
    prefix = [rng.randrange(16, vocab) for _ in range(600)]
    prompts = [prefix + [rng.randrange(16, vocab) for _ in range(rng.randint(1, 100))]]
    prompts += [prefix + [rng.randrange(16, vocab) for _ in range(n)] for n in (1, 7, 50, 99)]
    prompts.append(prefix)
    alone = logits_alone(cold, prompts[1:], GREEDY, monkeypatch)
    run_together(engine, prompts[:1], GREEDY)  # registers the prefix's whole chunks
    with recorded_logits(monkeypatch) as rows:
        ids = [engine.add_request(p, GREEDY) for p in prompts[1:]]
        hits = 0
        while engine.has_unfinished:
            engine.step()
            hits += engine.last_stats.num_cache_hit_tokens if engine.last_stats else 0
    assert hits == 512 * len(ids)
    assert_bitwise(alone, rows, ids)


@pytest.mark.slow
def test_seeded_sampling_ignores_neighbours(invariant_engine, prompts_128):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=3, max_tokens=16, ignore_eos=True)
    target = prompts_128[7]
    alone = tuple(invariant_engine.generate([target], params)[0].token_ids)
    crowd = SamplingParams(temperature=1.0, max_tokens=12)  # unseeded neighbours
    ids = [invariant_engine.add_request(target, params)]
    ids += [invariant_engine.add_request(p, crowd) for p in prompts_128[20:40]]
    tokens: list[int] = []
    while invariant_engine.has_unfinished:
        tokens += [
            t for d in invariant_engine.step() if d.request_id == ids[0] for t in d.token_ids
        ]
    assert tuple(tokens) == alone and len(alone) == 16


def test_seeded_penalized_sampling_is_unchanged_by_preemption(make_engine):
    """Replayed after a preemption, a request samples its next tokens with the same draw
    index and the same penalties (both from the tokens it generated) as without one."""
    params = SamplingParams(
        temperature=1.0,
        seed=5,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        max_tokens=24,
        ignore_eos=True,
    )

    def generate(**overrides: object) -> tuple[list[list[int]], Engine]:
        engine = make_engine(batch_invariant=True, max_model_len=256, **overrides)
        prompts = random_prompts(engine.model.config.vocab_size, 8, 100, seed=5)
        return [list(c.token_ids) for c in engine.generate(prompts, params)], engine

    roomy, _ = generate()
    cramped, engine = generate(block_size=16, num_kv_blocks=16)  # 256 slots, 8 sequences to 124
    assert engine.scheduler.num_preemptions_total > 0
    assert cramped == roomy


def test_modules_are_tiled_and_rotary_tabulated(invariant_engine):
    model = invariant_engine.model
    layer = model.get_decoder().layers[0]
    assert isinstance(layer.mlp, RowTiled)
    assert isinstance(layer.self_attn.q_proj, RowTiled)
    assert isinstance(model.get_output_embeddings(), RowTiled)
    assert isinstance(model.get_decoder().rotary_emb, TabulatedRotary)


@pytest.mark.slow
def test_row_tiles_are_row_position_invariant_here(invariant_engine):
    # The machine-level fact RowTiled relies on: inside one fixed-shape call, a row's result
    # does not depend on where in the tile it sits. Checked on this machine's kernels.
    layer = invariant_engine.model.get_decoder().layers[0]
    config = invariant_engine.runner.config
    for tile in (config.prefill_tile_rows, config.decode_tile_rows):
        hidden = invariant_engine.model.config.hidden_size
        x = torch.randn(tile, hidden, device=invariant_engine.model.device)
        assert row_tile_invariant(layer.mlp.inner, x)
        assert row_tile_invariant(layer.self_attn.q_proj.inner, x)
        assert row_tile_invariant(invariant_engine.model.get_output_embeddings().inner, x)


def test_row_tiled_equals_module_up_to_rounding():
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 37, 64)
    tiled = RowTiled(linear, TileRows(16))
    with torch.inference_mode():
        torch.testing.assert_close(tiled(x), linear(x))
        assert tiled(x).shape == (3, 37, 48)


def test_batch_invariant_mode_refuses_dense_attention(make_engine):
    with pytest.raises(ValueError, match="varlen"):
        make_engine(batch_invariant=True, attention_backend="dense")


def test_smollm2_logits_batched_and_preempted_equal_alone_bitwise(smollm2_dir, monkeypatch):
    """The real default model: 10 prompts of 1..300 tokens, packed and batched, then again
    with a KV pool small enough to preempt; every logits row equals the prompt alone. (The
    tiny model's tests above cover longer prompts and more of them; this one is the real
    model's weights and shapes, at a size CI can afford.)"""
    engine = Engine(EngineConfig(model=str(smollm2_dir), dtype="float32", batch_invariant=True))
    prompts = random_prompts(engine.model.config.vocab_size, 10, 300, seed=12)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = logits_alone(engine, prompts, params, monkeypatch)
    with recorded_logits(monkeypatch) as rows:
        ids = run_together(engine, prompts, params)
    assert_bitwise(alone, rows, ids)
    # Admission keeps the blocks a prompt's prefill needs, so only decodes growing into a
    # full pool preempt: 48 blocks of 8 do (the schedule, not the model, decides where).
    small = Engine(
        EngineConfig(
            model=str(smollm2_dir),
            dtype="float32",
            batch_invariant=True,
            block_size=8,
            num_kv_blocks=48,
            max_model_len=320,
        )
    )
    with recorded_logits(monkeypatch) as rows:
        ids = run_together(small, prompts, params)
    assert small.scheduler.num_preemptions_total > 0
    assert_bitwise(alone, rows, ids)
