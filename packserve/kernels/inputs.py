"""Turn a step's scheduled sequences into model inputs and attention metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from packserve.scheduler import ScheduledSequence

from .attention import DecodeBucket, DecodeMetadata, PrefillMetadata
from .choices import AttentionBackend
from .kv_cache import KVCache


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """One forward pass: token ids, positions, attention metadata, rows to sample from."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    meta: PrefillMetadata | DecodeMetadata
    sample_index: torch.Tensor  # [num_seqs] flat index into [R * L] of each last token


BlockTables = Mapping[str, Sequence[int]]  # request_id -> block ids (position // block_size)


def slots_of(block_ids: Sequence[int], positions: range, block_size: int) -> list[int]:
    """Cache slot of each position of a sequence with block table `block_ids`."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in positions]


def prefill_inputs(
    bins: tuple[tuple[ScheduledSequence, ...], ...],
    block_tables: BlockTables,
    kv_cache: KVCache,
    backend: AttentionBackend,
    dtype: torch.dtype,
) -> ModelInputs:
    """Packed rows: prompts back to back, positions restarting at 0 per prompt, rows padded to
    the longest row. Padding tokens write nothing and attend only to themselves."""
    if any(seq.start_pos for row in bins for seq in row):
        # A later chunk must also attend to its cached prefix, which this attention cannot.
        raise ValueError("prefill segments must start at position 0 (no chunked prefill)")
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
            positions[r][start:end] = range(seq.start_pos, seq.end_pos)
            segment[r][start:end] = [s] * seq.num_tokens
            token_index.extend(range(r * row_len + start, r * row_len + end))
            table = block_tables[seq.request_id]
            slots.extend(slots_of(table, range(seq.start_pos, seq.end_pos), block_size))
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


def length_buckets(
    lengths: Sequence[int], slack: float = 0.25, min_slack: int = 64
) -> list[tuple[int, int]]:
    """Cut `lengths`, sorted longest first, into runs [start, end). A run pads its members to
    its first (longest) length; it ends before the first member that would be padded by more
    than `slack` of that length or `min_slack` tokens, whichever is more."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i, n in enumerate(lengths):
        if lengths[start] - n > max(min_slack, slack * lengths[start]):
            runs.append((start, i))
            start = i
    if lengths:
        runs.append((start, len(lengths)))
    return runs


def _equal_runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """Runs [start, end) of equal consecutive values."""
    runs: list[tuple[int, int]] = []
    for i, v in enumerate(values):
        if runs and values[runs[-1][0]] == v:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def decode_inputs(
    decodes: tuple[ScheduledSequence, ...],
    block_tables: BlockTables,
    kv_cache: KVCache,
    dtype: torch.dtype,
    invariant_pad: int = 0,
) -> ModelInputs:
    """A ragged batch: one token per sequence at its own position. The model sees the batch
    longest context first, cut into length buckets; `sample_index` restores the given order.

    `invariant_pad` > 0 (batch-invariant mode): on CPU a sequence of context L attends over L
    rounded up to a multiple of `invariant_pad`, masked past L, in a bucket of the sequences
    with the same rounded length, on one thread (see `DecodeMetadata.single_thread`); on
    other devices, whose kernels choose their split by batch size, each sequence attends
    alone. Either way its attention computes the same whatever else is in the batch."""
    block_size = kv_cache.spec.block_size
    device = kv_cache.k.device
    order = sorted(range(len(decodes)), key=lambda i: -decodes[i].start_pos)
    seqs = [decodes[i] for i in order]
    lengths = [seq.start_pos + 1 for seq in seqs]  # tokens each sequence attends to
    padded_buckets = bool(invariant_pad) and device.type == "cpu"
    if padded_buckets:
        padded = [-(-n // invariant_pad) * invariant_pad for n in lengths]
        runs = _equal_runs(padded)
    elif invariant_pad:
        padded = lengths
        runs = [(i, i + 1) for i in range(len(seqs))]
    else:
        runs = length_buckets(lengths)
        padded = [lengths[start] for start, end in runs for _ in range(start, end)]
    max_blocks = -(-padded[0] // block_size)
    seq_tables = [block_tables[seq.request_id] for seq in seqs]
    tables = torch.tensor(
        [list(table[:max_blocks]) + [0] * (max_blocks - len(table)) for table in seq_tables],
        device=device,
    )  # [B, max_blocks]
    length = torch.tensor(lengths, device=device)
    buckets = []
    for start, end in runs:
        pos = torch.arange(padded[start], device=device)  # [L]
        mask = None
        if padded_buckets or lengths[end - 1] < padded[start]:  # mask each sequence's tail
            mask = torch.zeros(end - start, 1, 1, padded[start], dtype=dtype, device=device)
            past = (pos[None, :] >= length[start:end, None])[:, None, None]  # [b, 1, 1, L]
            mask.masked_fill_(past, float("-inf"))
        slots = tables[start:end, pos // block_size] * block_size + pos % block_size  # [b, L]
        buckets.append(DecodeBucket(start, end, slots, mask))
    new_slots = [
        slots_of(table, range(seq.start_pos, seq.start_pos + 1), block_size)[0]
        for seq, table in zip(seqs, seq_tables, strict=True)
    ]
    meta = DecodeMetadata(
        kv_cache=kv_cache,
        slot_mapping=torch.tensor(new_slots, device=device),
        buckets=tuple(buckets),
        single_thread=padded_buckets,
    )
    rank = [0] * len(order)  # rank[i]: where decodes[i] sits in the model's batch
    for r, i in enumerate(order):
        rank[i] = r
    return ModelInputs(
        input_ids=torch.tensor([[seq.token_ids[-1]] for seq in seqs], device=device),
        position_ids=torch.tensor([[seq.start_pos] for seq in seqs], device=device),
        meta=meta,
        sample_index=torch.tensor(rank, device=device),
    )
