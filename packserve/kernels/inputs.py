"""Turn a step's scheduled sequences into model inputs and attention metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from packserve.scheduler import ScheduledSequence

from .attention import ChunkAttention, DecodeAttention, DecodeBucket, PagedDecode, StepMetadata
from .choices import AttentionBackend, BucketKernel, DecodeKernel
from .kv_cache import KVCache
from .native import build as build_native


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """One forward pass: token ids, positions, attention metadata, rows to sample from."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    meta: StepMetadata
    sample_index: torch.Tensor  # [S] flat index into [R * L] of each sampling segment's last token


BlockTables = Mapping[str, Sequence[int]]  # request_id -> block ids (position // block_size)


def slots_of(block_ids: Sequence[int], positions: range, block_size: int) -> list[int]:
    """Cache slot of each position of a sequence with block table `block_ids`."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in positions]


def step_inputs(
    rows: tuple[tuple[ScheduledSequence, ...], ...],
    block_tables: BlockTables,
    kv_cache: KVCache,
    backend: AttentionBackend,
    dtype: torch.dtype,
    invariant_pad: int = 0,
    kernel: DecodeKernel = "sdpa",
) -> ModelInputs:
    """Packed rows: segments back to back, each at its own positions (restarting at its
    `start_pos`), rows padded to the longest row; pads write nothing and attend only to
    themselves. How each segment attends:

    - a prompt from position 0 (several tokens): causally to itself; with the dense backend,
      all of them in one masked call (block-diagonal causal mask per row), else one call each;
    - a piece after cached tokens (a chunk, the rest of a prefix hit): to its request's
      cached tokens and causally to itself, read back from the KV pool;
    - a single token (a decode, a one-token piece): to its cached context, with the other
      single tokens: through the paged kernel in one call (`paged_decode`), or batched in
      length buckets (`decode_attention`) through `kernel`.
    Sampling reads the last token of every segment whose `sample` is set, in row order."""
    block_size = kv_cache.spec.block_size
    device = kv_cache.k.device
    row_len = max(sum(seq.num_tokens for seq in row) for row in rows)
    ids = [[0] * row_len for _ in rows]
    positions = [[0] * row_len for _ in rows]
    segment = [[-1 - col for col in range(row_len)] for _ in rows]  # pads: a segment each
    token_index: list[int] = []
    slots: list[int] = []
    fresh: list[tuple[int, int, int]] = []
    chunks: list[ChunkAttention] = []
    singles: list[tuple[int, ScheduledSequence]] = []
    sample_index: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for s, seq in enumerate(row):
            end = start + seq.num_tokens
            flat = r * row_len + start
            ids[r][start:end] = seq.token_ids
            positions[r][start:end] = range(seq.start_pos, seq.end_pos)
            token_index.extend(range(flat, flat + seq.num_tokens))
            table = block_tables[seq.request_id]
            slots.extend(slots_of(table, range(seq.start_pos, seq.end_pos), block_size))
            if seq.num_tokens == 1:
                singles.append((flat, seq))
            elif seq.start_pos == 0:
                fresh.append((r, start, end))
                segment[r][start:end] = [s] * seq.num_tokens
            else:
                chunks.append(chunk_attention(r, start, seq, table, block_size, device))
            if seq.sample:
                sample_index.append(flat + seq.num_tokens - 1)
            start = end
    mask = None
    if backend == "dense" and fresh:
        seg = torch.tensor(segment, device=device)  # [R, L]
        causal = torch.ones(row_len, row_len, dtype=torch.bool, device=device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # [R, L, L]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, float("-inf"))
        mask = mask[:, None]  # [R, 1, L, L]
    decode: DecodeAttention | PagedDecode | None = None
    if singles and kernel == "paged":
        decode = paged_decode(singles, block_tables, kv_cache)
    elif singles and kernel != "paged":
        decode = decode_attention(singles, block_tables, kv_cache, dtype, invariant_pad, kernel)
    meta = StepMetadata(
        kv_cache=kv_cache,
        token_index=torch.tensor(token_index, device=device),
        slot_mapping=torch.tensor(slots, device=device),
        fresh=tuple(fresh),
        mask=mask,
        chunks=tuple(chunks),
        decode=decode,
    )
    return ModelInputs(
        input_ids=torch.tensor(ids, device=device),
        position_ids=torch.tensor(positions, device=device),
        meta=meta,
        sample_index=torch.tensor(sample_index, device=device, dtype=torch.long),
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


def chunk_attention(
    row: int,
    start: int,
    seq: ScheduledSequence,
    table: Sequence[int],
    block_size: int,
    device: torch.device,
) -> ChunkAttention:
    """A piece after cached tokens, at columns [start, start + n) of `row`: it reads its whole
    context [0, end_pos) back from the pool; query i sees keys 0..start_pos + i."""
    context = torch.tensor(slots_of(table, range(seq.end_pos), block_size), device=device)
    query_pos = torch.arange(seq.start_pos, seq.end_pos, device=device)
    allowed = torch.arange(seq.end_pos, device=device)[None, :] <= query_pos[:, None]
    return ChunkAttention(row, start, start + seq.num_tokens, context, allowed[None, None])


def paged_decode(
    singles: Sequence[tuple[int, ScheduledSequence]],
    block_tables: BlockTables,
    kv_cache: KVCache,
) -> PagedDecode:
    """Attention of single-token segments (flat index, segment) through the paged kernel:
    each sequence's block table, as far as its context goes, and its context length."""
    native = build_native().kernels
    if native is None:
        raise RuntimeError("the paged decode kernel is not built on this machine")
    block_size = kv_cache.spec.block_size
    device = kv_cache.k.device
    lengths = [seq.end_pos for _, seq in singles]
    width = -(-max(lengths) // block_size)
    tables = [list(block_tables[seq.request_id][:width]) for _, seq in singles]
    return PagedDecode(
        index=torch.tensor([index for index, _ in singles], device=device),
        tables=torch.tensor(
            [table + [0] * (width - len(table)) for table in tables],
            dtype=torch.int32,
            device=device,
        ),
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
        kernel=native.paged_decode,
    )


def decode_attention(
    singles: Sequence[tuple[int, ScheduledSequence]],
    block_tables: BlockTables,
    kv_cache: KVCache,
    dtype: torch.dtype,
    invariant_pad: int = 0,
    kernel: BucketKernel = "sdpa",
) -> DecodeAttention:
    """Attention of single-token segments (flat index, segment): longest context first, cut
    into length buckets, each bucket one batched call over its contexts' cached tokens.

    `invariant_pad` > 0 (batch-invariant mode): on CPU a sequence of context L attends over L
    rounded up to a multiple of `invariant_pad`, masked past L, in a bucket of the sequences
    with the same rounded length, on one thread (see `DecodeAttention.single_thread`); on
    other devices, whose kernels choose their split by batch size, each sequence attends
    alone. Either way its attention computes the same whatever else is in the batch."""
    block_size = kv_cache.spec.block_size
    device = kv_cache.k.device
    ordered = sorted(singles, key=lambda item: -item[1].start_pos)
    lengths = [seq.end_pos for _, seq in ordered]  # tokens each sequence attends to
    padded_buckets = bool(invariant_pad) and device.type == "cpu"
    if padded_buckets:
        padded = [-(-n // invariant_pad) * invariant_pad for n in lengths]
        runs = _equal_runs(padded)
    elif invariant_pad:
        padded = lengths
        runs = [(i, i + 1) for i in range(len(ordered))]
    else:
        runs = length_buckets(lengths)
        padded = [lengths[start] for start, end in runs for _ in range(start, end)]
    max_blocks = -(-padded[0] // block_size)
    seq_tables = [block_tables[seq.request_id] for _, seq in ordered]
    tables = torch.tensor(
        [list(table[:max_blocks]) + [0] * (max_blocks - len(table)) for table in seq_tables],
        device=device,
    )  # [B, max_blocks]
    length = torch.tensor(lengths, device=device)
    flat = torch.tensor([index for index, _ in ordered], device=device)
    buckets = []
    for start, end in runs:
        pos = torch.arange(padded[start], device=device)  # [L]
        mask = None
        if padded_buckets or lengths[end - 1] < padded[start]:  # mask each sequence's tail
            mask = torch.zeros(end - start, 1, 1, padded[start], dtype=dtype, device=device)
            past = (pos[None, :] >= length[start:end, None])[:, None, None]  # [b, 1, 1, L]
            mask.masked_fill_(past, float("-inf"))
        slots = tables[start:end, pos // block_size] * block_size + pos % block_size  # [b, L]
        buckets.append(DecodeBucket(flat[start:end], slots, mask))
    return DecodeAttention(buckets=tuple(buckets), single_thread=padded_buckets, kernel=kernel)
