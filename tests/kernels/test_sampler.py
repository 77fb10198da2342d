"""Sampling: each request's parameters act on its own row only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packserve.kernels.sampler import sample
from packserve.scheduler import SamplingParams


@dataclass(frozen=True)
class Row:
    """The request behind a row of logits, as sampling sees it."""

    params: SamplingParams
    output_token_ids: tuple[int, ...]


def seq(params: SamplingParams, outputs: tuple[int, ...] = ()) -> Row:
    return Row(params, outputs)


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_top_k_1_and_tiny_top_p_all_pick_the_argmax():
    logits = logits_rows(3)
    seqs = [
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=1.5, top_k=1)),
        seq(SamplingParams(temperature=1.5, top_p=1e-6)),
    ]
    tokens, _ = sample(logits, seqs, torch.Generator().manual_seed(0))
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_k_best():
    logits = logits_rows(1)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    gen = torch.Generator().manual_seed(1)
    for i in range(200):
        params = SamplingParams(temperature=2.0, top_k=5, seed=i)
        tokens, _ = sample(logits, [seq(params)], gen)
        assert tokens[0] in allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    seen = set()
    for i in range(300):
        tokens, _ = sample(logits, [seq(SamplingParams(top_p=0.8, seed=i))], torch.Generator())
        seen.add(tokens[0])
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8; token 2 is never needed


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    counts = torch.zeros(3)
    for i in range(3000):
        tokens, _ = sample(probs.log(), [seq(SamplingParams(seed=i))], torch.Generator())
        counts[tokens[0]] += 1
    torch.testing.assert_close(counts / counts.sum(), probs[0], atol=0.03, rtol=0)


def test_penalties_push_away_from_generated_tokens():
    logits = torch.tensor([[5.0, 4.5, 0.0]])
    plain, _ = sample(logits, [seq(SamplingParams(temperature=0), (0, 0))], torch.Generator())
    penalized, _ = sample(
        logits,
        [seq(SamplingParams(temperature=0, frequency_penalty=0.5), (0, 0))],  # 5 - 2*0.5 = 4
        torch.Generator(),
    )
    presence, _ = sample(
        logits,
        [seq(SamplingParams(temperature=0, presence_penalty=0.4), (0, 0))],  # 5 - 0.4 = 4.6
        torch.Generator(),
    )
    assert plain == [0] and penalized == [1] and presence == [0]


def test_logprobs_are_the_models_and_sorted():
    logits = logits_rows(2)
    seqs = [seq(SamplingParams(temperature=0, logprobs=4)), seq(SamplingParams(temperature=0))]
    tokens, logprobs = sample(logits, seqs, torch.Generator())
    expected = torch.log_softmax(logits[0], -1)
    entry = logprobs[0]
    assert entry is not None and logprobs[1] is None
    assert abs(entry.logprob - float(expected[tokens[0]])) < 1e-6
    assert [t for t, _ in entry.top] == torch.topk(expected, 4).indices.tolist()
    values = [lp for _, lp in entry.top]
    assert values == sorted(values, reverse=True)


def test_a_row_is_unaffected_by_its_neighbours():
    logits = logits_rows(4)
    target = seq(SamplingParams(temperature=1.0, seed=42))
    alone, _ = sample(logits[:1], [target], torch.Generator().manual_seed(0))
    others = [seq(SamplingParams(temperature=0.7)) for _ in range(3)]
    crowded, _ = sample(logits, [target, *others], torch.Generator().manual_seed(99))
    assert alone[0] == crowded[0]
