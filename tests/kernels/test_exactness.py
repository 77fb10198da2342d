"""Packing and batching never change results: the engine equals the model run alone."""

from __future__ import annotations

import random

import pytest
import torch

from packserve.kernels.inputs import step_inputs
from packserve.scheduler import SamplingParams, ScheduledSequence, blocks_for

CONFIGS = [
    pytest.param({"attention_backend": "varlen"}, id="packed-varlen"),
    pytest.param({"attention_backend": "dense"}, id="packed-dense"),
    pytest.param({"attention_backend": "varlen", "linear_backend": "torch"}, id="torch-linear"),
    pytest.param({"attention_backend": "varlen", "decode_attention": "matmul"}, id="matmul-decode"),
    pytest.param({"attention_backend": "varlen", "decode_attention": "sdpa"}, id="sdpa-decode"),
    pytest.param({"attention_backend": "varlen", "decode_attention": "paged"}, id="paged-decode"),
    pytest.param({"attention_backend": "varlen", "prefill_mode": "padded"}, id="padded-varlen"),
    pytest.param({"attention_backend": "dense", "prefill_mode": "padded"}, id="padded-dense"),
    # Small rows and budget: many rows per step and prompts arriving over several steps.
    pytest.param(
        {
            "max_prefill_row_len": 512,
            "max_model_len": 512,
            "max_num_batched_tokens": 700,
            "max_num_seqs": 12,
        },
        id="packed-small-budget",
    ),
]


def run(engine, workload):
    params = [SamplingParams(temperature=0, max_tokens=m) for _, m, _ in workload]
    ids = [engine.add_request(p, sp) for (p, _, _), sp in zip(workload, params, strict=True)]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished:
        for delta in engine.step():
            got[delta.request_id] += delta.token_ids
    return [got[i] for i in ids]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_greedy_equals_generate_alone(
    make_engine, mixed_workload, greedy_reference, overrides, device
):
    if overrides.get("decode_attention") == "paged" and device != "cpu":
        pytest.skip("the paged decode kernel is C++ for the CPU; the runner refuses it elsewhere")
    _, assert_matches = greedy_reference
    engine = make_engine(**overrides)
    outputs = run(engine, mixed_workload)
    for (prompt, _, expected), got in zip(mixed_workload, outputs, strict=True):
        assert_matches(got, expected, f"prompt of {len(prompt)} tokens")
    assert engine.scheduler.allocator.num_used == 0


@pytest.mark.parametrize("backend", ["varlen", "dense"])
def test_greedy_exact_under_preemption(make_engine, mixed_workload, greedy_reference, backend):
    _, assert_matches = greedy_reference
    # 40 blocks of 16 = 640 slots: a few long prompts fill it, so decodes must preempt.
    engine = make_engine(
        attention_backend=backend, block_size=16, num_kv_blocks=40, max_model_len=512
    )
    outputs = run(engine, mixed_workload)
    assert engine.scheduler.num_preemptions_total > 0
    for (prompt, _, expected), got in zip(mixed_workload, outputs, strict=True):
        assert_matches(got, expected, f"prompt of {len(prompt)} tokens")
    assert engine.scheduler.allocator.num_used == 0


@pytest.mark.parametrize("backend", ["varlen", "dense"])
def test_packed_prefill_logits_match_alone(make_engine, reference_model, mixed_workload, backend):
    engine = make_engine(attention_backend=backend)
    prompts = [p for p, _, _ in mixed_workload[:12]]
    next_block = 0
    row: list[ScheduledSequence] = []
    tables: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        n = blocks_for(len(prompt), engine.config.block_size)
        tables[str(i)] = list(range(next_block, next_block + n))
        next_block += n
        row.append(ScheduledSequence(str(i), tuple(prompt), 0, (), False, True))
    # Two rows of six prompts each: back to back, positions restarting per prompt.
    bins = (tuple(row[:6]), tuple(row[6:]))
    with torch.inference_mode():
        packed = engine.runner.forward(
            step_inputs(bins, tables, engine.runner.kv_cache, backend, torch.float32)
        )
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device=reference_model.device)
            alone = reference_model(ids).logits[0, -1]
            torch.testing.assert_close(packed[i], alone, atol=1e-4, rtol=0)


def test_seeded_sampling_ignores_batch_neighbours(make_engine, mixed_workload):
    params = SamplingParams(
        temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=24, ignore_eos=True
    )
    prompt = mixed_workload[5][0]

    def sample_with(neighbours: list[list[int]], params=params, **overrides) -> tuple[int, ...]:
        engine = make_engine(**overrides)
        for n in neighbours:
            engine.add_request(n, SamplingParams(temperature=1.0, max_tokens=30))
        target = engine.add_request(prompt, params)
        tokens: list[int] = []
        while engine.has_unfinished:
            tokens += [t for d in engine.step() if d.request_id == target for t in d.token_ids]
        return tuple(tokens)

    alone = sample_with([])
    crowded = sample_with([p for p, _, _ in mixed_workload[:10]])
    preempted = sample_with(
        [p for p, _, _ in mixed_workload[:10]], block_size=16, num_kv_blocks=40, max_model_len=512
    )
    assert len(alone) == 24
    assert alone == crowded == preempted
    # A different seed draws differently (the seed is really used).
    other_seed = SamplingParams(
        temperature=0.8, top_p=0.9, top_k=50, seed=8, max_tokens=24, ignore_eos=True
    )
    assert sample_with([], params=other_seed) != alone


SMOLLM2_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "Why is the sky blue? Answer in one sentence.",
    "Translate 'good morning' into Spanish.",
]


def test_smollm2_greedy_matches_generate_alone(smollm2_dir, greedy_reference):
    """The real default model, batched and packed: greedy output equals transformers
    `generate` on each prompt alone (up to near-ties, the default mode's contract)."""
    from transformers import AutoModelForCausalLM

    from packserve.engine.engine import Engine, EngineConfig

    reference_greedy, assert_matches = greedy_reference
    engine = Engine(EngineConfig(model=str(smollm2_dir), dtype="float32"))
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in SMOLLM2_QUESTIONS
    ]
    rng = random.Random(5)
    prompts += [[rng.randrange(100, 49152) for _ in range(n)] for n in (1, 37, 300, 800)]
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    answered = 0
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = reference_greedy(reference, list(prompt), 24)
        assert_matches(list(out.token_ids), expected, f"prompt of {len(prompt)} tokens")
        answered += "Paris" in out.text
    assert answered == 1  # a real model: the first question is answered


def shared_prefix_workload(reference_model, reference_greedy, count: int, seed: int):
    """`count` prompts that share a 200-token prefix (then 1..60 tokens of their own), with
    what `generate` makes of each alone."""
    rng = random.Random(seed)
    vocab = reference_model.config.vocab_size
    prefix = [rng.randrange(16, vocab) for _ in range(200)]
    workload = []
    for _ in range(count):
        prompt = prefix + [rng.randrange(16, vocab) for _ in range(rng.randint(1, 60))]
        workload.append((prompt, 12, reference_greedy(reference_model, prompt, 12)))
    return workload


@pytest.mark.parametrize("backend", ["varlen", "dense"])
def test_greedy_exact_through_chunks_prefix_hits_and_mixed_steps(
    make_engine, reference_model, greedy_reference, backend
):
    """A 48-token budget: prompts are prefilled in chunks, in steps mixed with decodes; the
    second wave finds the shared prefix (and its own first wave) in the cache. Every output
    equals the prompt alone."""
    reference_greedy, assert_matches = greedy_reference
    workload = shared_prefix_workload(reference_model, reference_greedy, 8, seed=3)
    engine = make_engine(attention_backend=backend, max_num_batched_tokens=48, max_num_seqs=8)
    mixed = chunked = 0
    for wave in range(2):
        ids = []
        for prompt, _, _ in workload:
            ids.append(engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12)))
        got: dict[str, list[int]] = {i: [] for i in ids}
        cached: dict[str, int] = {}
        while engine.has_unfinished:
            for delta in engine.step():
                got[delta.request_id] += delta.token_ids
                cached[delta.request_id] = delta.num_cached_tokens
            stats = engine.last_stats
            mixed += stats.num_decode_tokens > 0 and stats.num_prefill_tokens > 0
            chunked += stats.num_prefill_tokens > 0 and stats.num_sampled_tokens == 0
        for (prompt, _, expected), rid in zip(workload, ids, strict=True):
            assert_matches(got[rid], expected, f"wave {wave}, prompt of {len(prompt)} tokens")
            assert cached[rid] % engine.config.block_size == 0 and cached[rid] < len(prompt)
        if wave == 1:  # the whole prefix and more: the first wave ran every prompt
            assert all(cached[rid] >= 192 for rid in ids)
    assert mixed and chunked
    assert engine.scheduler.allocator.num_used == 0
