"""The sampler's grammar hook: a row's mask decides which tokens it may sample, whatever its
other parameters, and leaves every other row as it was."""

from __future__ import annotations

import pytest
import torch

from packserve.kernels.sampler import sample
from packserve.scheduler import SamplingParams

VOCAB = 50


class Row:
    def __init__(self, params: SamplingParams, outputs: tuple[int, ...] = ()) -> None:
        self.params = params
        self.prompt_token_ids = ()
        self.output_token_ids = outputs


def test_a_masked_row_samples_only_allowed_tokens():
    gen = torch.Generator().manual_seed(0)
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[[3, 17, 41]] = True
    rows = [
        Row(SamplingParams(temperature=0)),
        Row(SamplingParams(temperature=1.3, top_k=5)),
        Row(SamplingParams(temperature=0.8, top_p=0.5, frequency_penalty=2.0), (3, 3, 17)),
        # the extremes the API admits: dividing by a temperature under 1e-5 overflows, so it
        # is greedy; the largest repetition penalty on every allowed token (all negative)
        Row(SamplingParams(temperature=1e-38)),
        Row(SamplingParams(temperature=2.0, repetition_penalty=100.0), (3, 17, 41)),
    ]
    for seed in range(50):
        logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4
        logits[4, [3, 17, 41]] = -torch.rand(3, generator=torch.Generator().manual_seed(seed))
        tokens, _ = sample(logits, rows, gen, masks=[allowed] * 5)
        assert all(allowed[t] for t in tokens), tokens
    with pytest.raises(ValueError, match="repetition_penalty"):  # would overflow the logits
        SamplingParams(repetition_penalty=1e308)


def test_a_mask_leaves_the_other_rows_alone():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1)) * 4
    rows = [Row(SamplingParams(temperature=1.0, seed=s)) for s in (5, 6, 7)]
    plain, _ = sample(logits, rows, torch.Generator().manual_seed(0))
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[plain[1] ^ 1] = True  # a token the middle row did not pick
    masked, _ = sample(logits, rows, torch.Generator().manual_seed(0), masks=[None, allowed, None])
    assert masked[1] == plain[1] ^ 1
    assert (masked[0], masked[2]) == (plain[0], plain[2])
