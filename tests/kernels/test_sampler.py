"""Sampling: each request's parameters act on its own row only."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from packserve.kernels.sampler import sample
from packserve.scheduler import SamplingParams


@dataclass(frozen=True)
class Row:
    """The request behind a row of logits, as sampling sees it."""

    params: SamplingParams
    output_token_ids: tuple[int, ...]
    prompt_token_ids: tuple[int, ...] = ()


def seq(params: SamplingParams, outputs: tuple[int, ...] = (), prompt: tuple[int, ...] = ()) -> Row:
    return Row(params, outputs, prompt)


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_top_k_1_and_tiny_top_p_all_pick_the_argmax():
    logits = logits_rows(4)
    seqs = [
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=1.5, top_k=1)),
        seq(SamplingParams(temperature=1.5, top_p=1e-6)),
        seq(SamplingParams(temperature=1.5, top_p=5e-324)),  # 0 in float32
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


def test_logit_bias_forces_and_bans_tokens_greedy_and_sampled():
    logits = logits_rows(1)
    last = int(logits[0].argmin())
    best = int(logits[0].argmax())
    gen = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)):
        forced = replace(params, logit_bias=((last, 100.0),))
        assert sample(logits, [seq(forced)], gen)[0] == [last]
    banned = SamplingParams(temperature=0, logit_bias=((best, -100.0),))
    assert sample(logits, [seq(banned)], gen)[0] != [best]


def test_min_p_drops_tokens_below_the_fraction_of_the_top_one():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = set()
    for i in range(300):
        params = SamplingParams(min_p=0.5, seed=i)  # keeps p >= 0.25
        seen.add(sample(probs.log(), [seq(params)], torch.Generator())[0][0])
    assert seen == {0, 1}
    hot = {
        sample(probs.log(), [seq(SamplingParams(seed=i))], torch.Generator())[0][0]
        for i in range(300)
    }
    assert hot == {0, 1, 2, 3}  # without min_p every token is drawn


def test_repetition_penalty_counts_prompt_and_output_tokens():
    logits = torch.tensor([[3.0, 2.0, -1.0, -1.5]])
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    gen = torch.Generator()
    assert sample(logits, [seq(greedy)], gen)[0] == [0]  # nothing seen: no change
    assert sample(logits, [seq(greedy, prompt=(0,))], gen)[0] == [1]  # 3 / 2 < 2
    assert sample(logits, [seq(greedy, outputs=(0,))], gen)[0] == [1]
    # A negative logit is multiplied: -1 * 2 = -2 falls below -1.5.
    negative = torch.tensor([[-1.0, -1.5]])
    assert sample(negative, [seq(greedy, prompt=(0,))], gen)[0] == [1]
    # Below 1 the seen tokens are favoured.
    favour = SamplingParams(temperature=0, repetition_penalty=0.5)
    assert sample(logits, [seq(favour, prompt=(1,))], gen)[0] == [1]  # 2 / 0.5 > 3


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[1.0, 0.0, 5.0, 4.0]])  # 2 is EOS, 3 a stop token id
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,))
    gen = torch.Generator()
    eos = {2}
    assert sample(logits, [seq(params, outputs=(0,))], gen, eos_token_ids=eos)[0] == [0]
    assert sample(logits, [seq(params, outputs=(0, 0))], gen, eos_token_ids=eos)[0] == [2]
    # ignore_eos leaves EOS alone: it does not end the request anyway.
    ignoring = replace(params, ignore_eos=True)
    assert sample(logits, [seq(ignoring, outputs=(0,))], gen, eos_token_ids=eos)[0] == [2]


def test_mixed_settings_in_one_batch_match_each_row_alone():
    """A row's settings never touch a neighbour's logits: each row of a batch with every
    setting mixed samples what it samples alone (seeded, so the draw is the row's own), and the
    logprobs are the same."""
    logits = logits_rows(6, vocab=64, seed=5)
    rows = [
        seq(SamplingParams(temperature=0, logprobs=3)),
        seq(SamplingParams(temperature=0, logit_bias=((7, 100.0),), logprobs=3)),
        seq(SamplingParams(temperature=1.0, seed=1, min_p=0.2)),
        seq(SamplingParams(temperature=0, repetition_penalty=1.8), (5, 9), (1, 2, 3)),
        seq(SamplingParams(temperature=0.8, seed=2, min_tokens=4), (1,)),
        seq(SamplingParams(temperature=1.2, seed=3, top_k=5, logit_bias=((0, -100.0),))),
    ]
    eos = {int(logits[4].argmax())}
    batch_tokens, batch_logprobs = sample(
        logits, rows, torch.Generator().manual_seed(0), eos_token_ids=eos
    )
    for i, row in enumerate(rows):
        tokens, logprobs = sample(
            logits[i : i + 1], [row], torch.Generator().manual_seed(9), eos_token_ids=eos
        )
        assert tokens[0] == batch_tokens[i], i
        assert logprobs[0] == batch_logprobs[i], i
    # The plain greedy row is exactly the argmax, as without any of these settings.
    assert batch_tokens[0] == int(logits[0].argmax())
    assert batch_tokens[1] == 7 and batch_tokens[4] not in eos


def test_the_argmax_kernel_samples_what_torch_samples(kernels):
    """The C++ argmax (native.py) in place of torch's: the same tokens for greedy rows,
    constrained rows and seeded draws (whose race is an argmax too)."""
    logits = logits_rows(5, vocab=49152, seed=8)
    logits[2, 100:200] = logits[2].max() + 1  # a tie across 100 tokens: the first wins
    rows = [
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=0, logit_bias=((11, 100.0),))),
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=1.0, seed=4)),
        seq(SamplingParams(temperature=0.7, seed=5, top_k=50)),
    ]
    mask = torch.zeros(49152, dtype=torch.bool)
    mask[1000:1010] = True
    masks = [None, None, None, None, mask]
    want, _ = sample(logits, rows, torch.Generator().manual_seed(0), masks=masks)
    got, _ = sample(
        logits, rows, torch.Generator().manual_seed(0), masks=masks, argmax=kernels.row_argmax
    )
    assert got == want
    assert got[1] == 11 and got[2] == 100 and 1000 <= got[4] < 1010
