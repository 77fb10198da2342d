"""Ragged decode: the batch is cut into length buckets, and that changes no result."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from packserve.kernels.inputs import length_buckets, step_inputs
from packserve.scheduler import ScheduledSequence, blocks_for


@given(st.lists(st.integers(1, 5000), max_size=300), st.floats(0, 1), st.integers(0, 512))
def test_length_buckets_cover_the_batch_with_bounded_padding(lengths, slack, min_slack):
    lengths = sorted(lengths, reverse=True)
    runs = length_buckets(lengths, slack, min_slack)
    # Contiguous, in order, every row exactly once.
    assert [i for start, end in runs for i in range(start, end)] == list(range(len(lengths)))
    assert all(start < end for start, end in runs)
    for start, end in runs:
        longest = lengths[start]
        allowed = max(min_slack, slack * longest)
        assert all(longest - n <= allowed for n in lengths[start:end])
    # A run ends only where the next length would be padded past the bound.
    for (start, _), (nxt, _) in zip(runs, runs[1:], strict=False):
        assert lengths[start] - lengths[nxt] > max(min_slack, slack * lengths[start])


def test_bucketed_decode_logits_match_alone(make_engine, reference_model, mixed_workload):
    """Prefill 16 prompts of 1..300 tokens, then decode one token each in one ragged batch, in
    the scheduler's (unsorted) order: each sequence's logits equal the model run alone."""
    engine = make_engine()
    kv = engine.runner.kv_cache
    block_size = engine.config.block_size
    cases = [(p, expected.tokens[0]) for p, _, expected in mixed_workload[:16]]
    prefills, decodes = [], []
    tables: dict[str, list[int]] = {}
    next_block = 0
    for i, (prompt, first) in enumerate(cases):
        n = blocks_for(len(prompt) + 1, block_size)
        tables[str(i)] = list(range(next_block, next_block + n))
        next_block += n
        prefills.append(ScheduledSequence(str(i), tuple(prompt), 0, (), False, True))
        decodes.append(ScheduledSequence(str(i), (first,), len(prompt), (), True, True))
    inputs = step_inputs((tuple(decodes),), tables, kv, "varlen", torch.float32)
    assert inputs.meta.decode is not None
    assert len(inputs.meta.decode.buckets) > 2  # lengths 1..300 really take several buckets
    with torch.inference_mode():
        prefill = step_inputs((tuple(prefills),), tables, kv, "varlen", torch.float32)
        engine.runner.forward(prefill)
        logits = engine.runner.forward(inputs)
        for i, (prompt, first) in enumerate(cases):
            alone = reference_model(torch.tensor([prompt + [first]])).logits[0, -1]
            torch.testing.assert_close(logits[i], alone, atol=1e-4, rtol=0)
