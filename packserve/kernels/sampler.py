"""Per-request sampling: penalties, temperature, top-k, top-p, seeded draws, logprobs."""

from __future__ import annotations

import torch

from packserve.scheduler import ScheduledSequence, TokenLogprobs

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed space


def draw_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator for the `index`-th token of a seeded request.

    Derived from (seed, index) alone, so a request draws the same numbers whatever its batch
    neighbours are, and after a preemption replays exactly.
    """
    return torch.Generator(device=device).manual_seed((seed + _GOLDEN * (index + 1)) % 2**63)


def apply_penalties(logits: torch.Tensor, seqs: list[ScheduledSequence]) -> None:
    """OpenAI presence/frequency penalties over each sequence's generated tokens, in place."""
    for i, seq in enumerate(seqs):
        params = seq.params
        if not (params.presence_penalty or params.frequency_penalty) or not seq.output_token_ids:
            continue
        ids = torch.tensor(seq.output_token_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[1]).to(logits.dtype)  # [V]
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, seqs: list[ScheduledSequence], generator: torch.Generator
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per row of logits [N, V] (float32); `generator` serves unseeded requests."""
    raw_logprobs = None
    if any(seq.params.logprobs is not None for seq in seqs):
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [N, V] before any processing
    logits = logits.clone()
    apply_penalties(logits, seqs)
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows keep these
    for i, seq in enumerate(seqs):
        params = seq.params
        if params.greedy:
            continue
        row = _filter(logits[i] / params.temperature, params.top_k, params.top_p)
        probs = row.softmax(-1)
        gen = generator
        if params.seed is not None:
            gen = draw_generator(params.seed, len(seq.output_token_ids), logits.device)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs).exponential_(generator=gen)
        tokens[i] = int((probs / noise).argmax())
    return tokens, _logprobs(raw_logprobs, tokens, seqs)


def _logprobs(
    raw: torch.Tensor | None, tokens: list[int], seqs: list[ScheduledSequence]
) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(seqs)
    if raw is None:
        return out
    for i, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is None:
            continue
        top = torch.topk(raw[i], k) if k else None
        out[i] = TokenLogprobs(
            logprob=float(raw[i, tokens[i]]),
            top=tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else (),
        )
    return out
