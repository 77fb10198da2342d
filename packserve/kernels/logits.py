"""Per-request logits processors: repetition penalty, logit bias, the min_tokens mask, min_p.

Each acts on the rows whose request asks for it and leaves every other row as it is, so a row
without these settings samples exactly as it would without this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from packserve.scheduler import SamplingParams


class SamplingRow(Protocol):
    """What sampling reads of the request behind one row of logits."""

    @property
    def params(self) -> SamplingParams: ...

    @property
    def prompt_token_ids(self) -> Sequence[int]:
        """The repetition penalty counts them."""
        ...

    @property
    def output_token_ids(self) -> Sequence[int]:
        """Generated so far: penalties count them, and their number is the seeded draw index."""
        ...


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Every token seen in a row's prompt or output: a positive logit divided by the
    penalty, a negative one multiplied (HF and vLLM), in place."""
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty == 1.0:
            continue
        seen = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)  # [V]
        for ids in (row.prompt_token_ids, row.output_token_ids):
            if ids:
                seen[torch.tensor(ids, device=logits.device)] = True
        penalized = torch.where(logits[i] > 0, logits[i] / penalty, logits[i] * penalty)
        logits[i] = torch.where(seen, penalized, logits[i])


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Each row's biases added to its logits, in place."""
    for i, row in enumerate(rows):
        if not row.params.logit_bias:
            continue
        ids, biases = zip(*row.params.logit_bias, strict=True)
        index = torch.tensor(ids, device=logits.device)
        logits[i, index] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)


def apply_min_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Iterable[int]
) -> None:
    """Rows still under their min_tokens cannot end: their stop token ids (and EOS, unless
    ignored) are masked, in place."""
    for i, row in enumerate(rows):
        params = row.params
        if len(row.output_token_ids) >= params.min_tokens:
            continue
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned.update(eos_token_ids)
        if banned:
            logits[i, torch.tensor(sorted(banned), device=logits.device)] = float("-inf")


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """One row's logits [V] without the tokens less likely than min_p x the most likely."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
