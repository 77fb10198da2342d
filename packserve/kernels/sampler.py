"""Per-request sampling: penalties, logit bias, temperature, min-p, top-k, top-p, seeded draws,
logprobs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from packserve.scheduler import TokenLogprobs

from .logits import (
    SamplingRow,
    apply_logit_bias,
    apply_min_tokens,
    apply_repetition_penalty,
    min_p_filter,
)
from .native import ArgmaxKernel

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed space


def draw_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator for the `index`-th token of a seeded request.

    Derived from (seed, index) alone, so a request draws the same numbers whatever its batch
    neighbours are, and after a preemption replays exactly.
    """
    return torch.Generator(device=device).manual_seed((seed + _GOLDEN * (index + 1)) % 2**63)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """OpenAI presence/frequency penalties over each row's generated tokens, in place."""
    for i, row in enumerate(rows):
        params = row.params
        if not (params.presence_penalty or params.frequency_penalty) or not row.output_token_ids:
            continue
        ids = torch.tensor(row.output_token_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[1]).to(logits.dtype)  # [V]
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already enough
        # The most likely token always stays: a top_p below float32's range compares as 0.
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    generator: torch.Generator,
    *,
    eos_token_ids: Iterable[int] = (),
    masks: Sequence[torch.Tensor | None] | None = None,
    in_place: bool = False,
    argmax: ArgmaxKernel | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per row of logits [N, V] (float32), drawn by `rows[i]`'s parameters;
    `generator` serves unseeded requests; `eos_token_ids` end a request (min_tokens masks
    them). `masks[i]`, when given, is row i's grammar: bool [V], the tokens it may sample;
    the others are cut before any other processing, in that row only. Logprobs are the
    model's, before any processing. `in_place`: process `logits` itself, not a copy (the
    caller's own, read no more). `argmax`: the C++ kernel computing torch.argmax(x, dim=-1) for
    CPU float32 rows (native.py), where it is built."""

    def first_max(x: torch.Tensor) -> torch.Tensor:  # [N, V] -> [N]
        return argmax(x) if argmax is not None else x.argmax(dim=-1)

    raw_logprobs = None
    if any(row.params.logprobs is not None for row in rows):
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [N, V] before any processing
    if not in_place:
        logits = logits.clone()
    for i, mask in enumerate(masks or ()):
        if mask is not None:
            logits[i].masked_fill_(~mask, float("-inf"))
    apply_logit_bias(logits, rows)  # first, as vLLM: the penalties act on biased logits
    apply_min_tokens(logits, rows, eos_token_ids)
    apply_repetition_penalty(logits, rows)
    apply_penalties(logits, rows)
    tokens = first_max(logits).tolist()  # greedy rows keep these
    for i, row in enumerate(rows):
        params = row.params
        if params.greedy:
            continue
        scaled = min_p_filter(logits[i] / params.temperature, params.min_p)
        filtered = _filter(scaled, params.top_k, params.top_p)
        probs = filtered.softmax(-1)
        gen = generator
        if params.seed is not None:
            gen = draw_generator(params.seed, len(row.output_token_ids), logits.device)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs).exponential_(generator=gen)
        tokens[i] = int(first_max((probs / noise).unsqueeze(0))[0])
    return tokens, _logprobs(raw_logprobs, tokens, rows)


def _logprobs(
    raw: torch.Tensor | None, tokens: list[int], rows: Sequence[SamplingRow]
) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if raw is None:
        return out
    for i, row in enumerate(rows):
        k = row.params.logprobs
        if k is None:
            continue
        top = torch.topk(raw[i], k) if k else None
        out[i] = TokenLogprobs(
            logprob=float(raw[i, tokens[i]]),
            top=tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else (),
        )
    return out
