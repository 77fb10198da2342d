"""Turn a step's scheduled sequences into model inputs and attention metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packserve.scheduler import ScheduledSequence

from .attention import AttentionBackend, DecodeMetadata, PrefillMetadata
from .kv_cache import KVCache


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """One forward pass: token ids, positions, attention metadata, rows to sample from."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    meta: PrefillMetadata | DecodeMetadata
    sample_index: torch.Tensor  # [num_seqs] flat index into [R * L] of each last token


def slots_of(block_ids: tuple[int, ...], positions: range, block_size: int) -> list[int]:
    """Cache slot of each position of a sequence with block table `block_ids`."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in positions]


def prefill_inputs(
    bins: tuple[tuple[ScheduledSequence, ...], ...],
    kv_cache: KVCache,
    backend: AttentionBackend,
    dtype: torch.dtype,
) -> ModelInputs:
    """Packed rows: prompts back to back, positions restarting at 0 per prompt, rows padded to
    the longest row. Padding tokens write nothing and attend only to themselves."""
    block_size = kv_cache.spec.block_size
    row_len = max(sum(seq.num_tokens for seq in row) for row in bins)
    ids = [[0] * row_len for _ in bins]
    positions = [[0] * row_len for _ in bins]
    segment = [[-1 - col for col in range(row_len)] for _ in bins]  # pads: a segment each
    token_index: list[int] = []
    slots: list[int] = []
    segments: list[tuple[int, int, int]] = []
    sample_index: list[int] = []
    for r, row in enumerate(bins):
        start = 0
        for s, seq in enumerate(row):
            end = start + seq.num_tokens
            ids[r][start:end] = seq.token_ids
            positions[r][start:end] = range(seq.num_tokens)
            segment[r][start:end] = [s] * seq.num_tokens
            token_index.extend(range(r * row_len + start, r * row_len + end))
            slots.extend(slots_of(seq.block_ids, range(seq.num_tokens), block_size))
            segments.append((r, start, end))
            sample_index.append(r * row_len + end - 1)
            start = end
    device = kv_cache.k.device
    mask = None
    if backend == "dense":
        seg = torch.tensor(segment, device=device)  # [R, L]
        causal = torch.ones(row_len, row_len, dtype=torch.bool, device=device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # [R, L, L]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, float("-inf"))
        mask = mask[:, None]  # [R, 1, L, L]
    meta = PrefillMetadata(
        kv_cache=kv_cache,
        token_index=torch.tensor(token_index, device=device),
        slot_mapping=torch.tensor(slots, device=device),
        segments=tuple(segments),
        mask=mask,
    )
    return ModelInputs(
        input_ids=torch.tensor(ids, device=device),
        position_ids=torch.tensor(positions, device=device),
        meta=meta,
        sample_index=torch.tensor(sample_index, device=device),
    )


def decode_inputs(
    decodes: tuple[ScheduledSequence, ...], kv_cache: KVCache, dtype: torch.dtype
) -> ModelInputs:
    """A ragged batch: one token per sequence at its own position."""
    block_size = kv_cache.spec.block_size
    device = kv_cache.k.device
    lengths = [seq.start_pos + 1 for seq in decodes]  # tokens each sequence attends to
    max_len = max(lengths)
    max_blocks = -(-max_len // block_size)
    tables = torch.tensor(
        [
            list(seq.block_ids[:max_blocks]) + [0] * (max_blocks - len(seq.block_ids[:max_blocks]))
            for seq in decodes
        ],
        device=device,
    )  # [B, max_blocks]
    pos = torch.arange(max_len, device=device)  # [L]
    context_slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    length = torch.tensor(lengths, device=device)
    mask = torch.zeros(len(decodes), 1, 1, max_len, dtype=dtype, device=device)
    mask.masked_fill_((pos[None, :] >= length[:, None])[:, None, None], float("-inf"))
    start = torch.tensor([seq.start_pos for seq in decodes], device=device)
    meta = DecodeMetadata(
        kv_cache=kv_cache,
        slot_mapping=context_slots.gather(1, start[:, None])[:, 0],
        context_slots=context_slots,
        mask=mask,
    )
    return ModelInputs(
        input_ids=torch.tensor([[seq.token_ids[-1]] for seq in decodes], device=device),
        position_ids=start[:, None],
        meta=meta,
        sample_index=torch.arange(len(decodes), device=device),
    )
