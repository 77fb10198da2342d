"""Ragged decode: the batch is cut into length buckets, and that changes no result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from packserve.kernels.attention import DecodeAttention, PagedDecode, matmul_decode, sdpa_decode
from packserve.kernels.inputs import length_buckets, step_inputs
from packserve.kernels.native import build as build_native
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


@pytest.mark.parametrize("kernel", ["sdpa", "matmul", "paged"])
def test_ragged_decode_logits_match_alone(make_engine, reference_model, mixed_workload, kernel):
    """Prefill 16 prompts of 1..300 tokens, then decode one token each in one ragged batch, in
    the scheduler's (unsorted) order, through each decode kernel (the bucketed ones in several
    length buckets, the paged one reading the pool in place): each sequence's logits equal the
    model run alone."""
    if kernel == "paged" and build_native().kernels is None:
        pytest.skip(f"the C++ kernels do not build here: {build_native().error}")
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
    inputs = step_inputs((tuple(decodes),), tables, kv, "varlen", torch.float32, 0, kernel)
    decode = inputs.meta.decode
    if kernel == "paged":
        assert isinstance(decode, PagedDecode) and decode.lengths.tolist() == [
            len(prompt) + 1 for prompt, _ in cases
        ]
    else:
        assert isinstance(decode, DecodeAttention) and decode.kernel == kernel
        assert len(decode.buckets) > 2  # lengths 1..300 really take several buckets
    with torch.inference_mode():
        prefill = step_inputs((tuple(prefills),), tables, kv, "varlen", torch.float32)
        engine.runner.forward(prefill)
        logits = engine.runner.forward(inputs)
        for i, (prompt, first) in enumerate(cases):
            alone = reference_model(torch.tensor([prompt + [first]])).logits[0, -1]
            torch.testing.assert_close(logits[i], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_decode_equals_the_fused_kernel_and_ignores_masked_keys(dtype):
    """Grouped matmuls (query heads that share a K/V head as its rows) compute what SDPA with
    GQA computes, to the dtype's rounding; keys past a sequence's length change nothing."""
    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, length, dim = 6, 9, 3, 40, 16
    q = torch.randn(b, heads, dim, generator=g).to(dtype)
    keys = torch.randn(b, kv_heads, length, dim, generator=g).to(dtype)
    values = torch.randn(b, kv_heads, length, dim, generator=g).to(dtype)
    lengths = torch.tensor([40, 33, 17, 9, 2, 1])
    mask = torch.zeros(b, 1, 1, length, dtype=dtype)
    mask.masked_fill_((torch.arange(length) >= lengths[:, None])[:, None, None], float("-inf"))
    got = matmul_decode(q, keys, values, mask, dim**-0.5)
    assert got.shape == (b, heads, dim) and got.dtype == dtype
    want = sdpa_decode(q.float(), keys.float(), values.float(), mask.float(), dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)
    past = torch.arange(length) >= lengths[:, None]  # [b, L]
    noisy_keys, noisy_values = keys.clone(), values.clone()
    noisy_keys.masked_fill_(past[:, None, :, None], 100.0)
    noisy_values.masked_fill_(past[:, None, :, None], -100.0)
    again = matmul_decode(q, noisy_keys, noisy_values, mask, dim**-0.5)
    assert torch.equal(again, got)
