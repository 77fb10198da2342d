"""Attention for packed steps (prompts, chunks, decodes), plugged into transformers' registry.

The model code stays unmodified: it computes Q/K/V and RoPE, then calls the function registered
as `packserve` with our per-step metadata in the `packserve_meta` keyword argument. That
function writes the new K/V into the paged pool and attends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .choices import BucketKernel
from .kv_cache import KVCache
from .native import PagedKernel

ATTENTION_NAME = "packserve"


@dataclass(frozen=True, slots=True)
class ChunkAttention:
    """A prefill piece after cached tokens: columns [start, end) of `row`."""

    row: int
    start: int
    end: int
    context_slots: torch.Tensor  # [S] slots of its context: cached tokens, then its own
    allowed: torch.Tensor  # [1, 1, n, S] bool: causal, offset by the cached tokens


@dataclass(frozen=True, slots=True)
class DecodeBucket:
    """Single-token segments whose contexts are padded to one length."""

    index: torch.Tensor  # [b] flat index (row * row_len + col) of each token
    context_slots: torch.Tensor  # [b, L] slots of each sequence's tokens, padded with slot 0
    # [b, 1, 1, L] additive: 0 within the sequence's length, -inf past it; None: all length L
    mask: torch.Tensor | None


def sdpa_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One token per sequence through torch's fused kernel. q [b, H, D]; keys and values
    [b, Hkv, L, D]; mask [b, 1, 1, L] additive or None -> [b, H, D]."""
    attended = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )  # [b, H, 1, D]
    return attended[:, :, 0]


def matmul_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The same as `sdpa_decode` in two batched matmuls over each sequence's K/V rows as the
    pool stores them ([L, Hkv * D], no copy of the gathered context): every query head is
    spread over all K/V heads' columns, zero outside its own, so one [H, Hkv * D] x
    [Hkv * D, L] product gives every head's scores (Hkv times the FLOPs of a grouped product,
    but these are few; what costs is reading K/V, once here), and the output keeps each
    head's own block. Scores and softmax in float32. On a CPU torch's fused kernel runs one
    bfloat16 token against a context slowly (3-4x these matmuls on an AMD EPYC); `auto` times
    both (kernels/autotune.py)."""
    b, kv_heads, length, dim = keys.shape
    heads = q.shape[1]
    group = heads // kv_heads
    own = torch.arange(kv_heads, device=q.device)
    spread = q.new_zeros(b, kv_heads, group, kv_heads, dim)  # [b, Hkv, g, Hkv, D]
    spread[:, own, :, own] = q.view(b, kv_heads, group, dim).transpose(0, 1)
    rows_k = keys.transpose(1, 2).reshape(b, length, kv_heads * dim)  # a view of the gather
    rows_v = values.transpose(1, 2).reshape(b, length, kv_heads * dim)
    scores = torch.bmm(spread.view(b, heads, -1), rows_k.transpose(1, 2))  # [b, H, L]
    scores = scores.float().mul_(scale)
    if mask is not None:
        scores.add_(mask.view(b, 1, length))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.bmm(probs, rows_v).view(b, kv_heads, group, kv_heads, dim)
    return out[:, own, :, own].transpose(0, 1).reshape(b, heads, dim)  # [b, H, D]


BUCKET_KERNELS = {"sdpa": sdpa_decode, "matmul": matmul_decode}


@dataclass(frozen=True, slots=True)
class DecodeAttention:
    """Every single-token segment of a step; each attends to its own cached tokens. Ordered
    longest context first and cut into buckets of similar length, so gathering and attention
    cost about the real context tokens, not batch x longest context."""

    buckets: tuple[DecodeBucket, ...]
    # Batch-invariant mode on CPU: attend on one thread. torch's CPU flash kernel parallelizes
    # a call differently when it holds fewer sequences than there are threads, which changes
    # a sequence's rounding with the number of sequences beside it (measured, torch 2.13);
    # on one thread every call takes the same path.
    single_thread: bool
    kernel: BucketKernel

    def attend(
        self, kv_cache: KVCache, layer: int, q: torch.Tensor, out: torch.Tensor, scale: float
    ) -> None:
        """q: [R*L, H, D] every token's query; writes the buckets' rows of out [R*L, H, D]."""
        if not self.single_thread:
            return self._attend(kv_cache, layer, q, out, scale)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._attend(kv_cache, layer, q, out, scale)
        finally:
            torch.set_num_threads(threads)

    def _attend(
        self, kv_cache: KVCache, layer: int, q: torch.Tensor, out: torch.Tensor, scale: float
    ) -> None:
        kernel = BUCKET_KERNELS[self.kernel]
        for bucket in self.buckets:
            keys, values = kv_cache.gather(layer, bucket.context_slots)  # [b, Hkv, L, D]
            attended = kernel(q.index_select(0, bucket.index), keys, values, bucket.mask, scale)
            out.index_copy_(0, bucket.index, attended)


@dataclass(frozen=True, slots=True)
class PagedDecode:
    """Every single-token segment of a step through the paged kernel (kernels/native.py): each
    reads its own cached tokens from the pool by its block table, all in one call a layer."""

    index: torch.Tensor  # [B] flat index (row * row_len + col) of each token
    tables: torch.Tensor  # [B, max blocks] int32 block ids, padded with 0
    lengths: torch.Tensor  # [B] int32 tokens each attends to
    kernel: PagedKernel

    def attend(
        self, kv_cache: KVCache, layer: int, q: torch.Tensor, out: torch.Tensor, scale: float
    ) -> None:
        """q: [R*L, H, D] every token's query; writes the decodes' rows of out [R*L, H, D]."""
        attended = self.run(kv_cache, layer, q.index_select(0, self.index), scale)
        out.index_copy_(0, self.index, attended)

    def run(self, kv_cache: KVCache, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [B, H, D] the decodes' queries, in order -> their attention [B, H, D]."""
        return self.kernel(
            q.contiguous(),
            kv_cache.k[layer],
            kv_cache.v[layer],
            self.tables,
            self.lengths,
            kv_cache.spec.block_size,
            scale,
        )


@dataclass(frozen=True, slots=True)
class StepMetadata:
    """Packed rows of segments (see `inputs.step_inputs` for how each kind attends)."""

    kv_cache: KVCache
    token_index: torch.Tensor  # [N] flat index (row * row_len + col) of each real token
    slot_mapping: torch.Tensor  # [N] cache slot of each real token
    fresh: tuple[tuple[int, int, int], ...]  # (row, start, end) of each prompt from position 0
    mask: torch.Tensor | None  # [R, 1, L, L] block-diagonal causal mask (dense backend only)
    chunks: tuple[ChunkAttention, ...]
    decode: DecodeAttention | PagedDecode | None

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # q: [R, H, L, D]; k, v: [R, Hkv, L, D] -> [R, L, H, D]
        rows, heads, row_len, dim = q.shape
        flat_k = k.transpose(1, 2).reshape(rows * row_len, k.shape[1], dim)  # [R*L, Hkv, D]
        flat_v = v.transpose(1, 2).reshape(rows * row_len, v.shape[1], dim)
        if len(self.token_index) < rows * row_len:  # else no pads: every position, in order
            flat_k, flat_v = flat_k[self.token_index], flat_v[self.token_index]
        self.kv_cache.write(layer, self.slot_mapping, flat_k, flat_v)  # [N, Hkv, D] each
        decode = self.decode
        if isinstance(decode, PagedDecode) and len(decode.index) == rows * row_len:
            # every position a decode, in order (a decode-only step): no scatter back
            flat_q = q.transpose(1, 2).reshape(rows * row_len, heads, dim)
            return decode.run(self.kv_cache, layer, flat_q, scale).view(rows, row_len, heads, dim)
        if self.mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=True
            )  # [R, H, L, D]
            out = out.transpose(1, 2).reshape(rows * row_len, heads, dim)
        else:
            out = q.new_zeros(rows * row_len, heads, dim)
            for row, start, end in self.fresh:  # each prompt attends only to itself
                attended = F.scaled_dot_product_attention(
                    q[row : row + 1, :, start:end],
                    k[row : row + 1, :, start:end],
                    v[row : row + 1, :, start:end],
                    is_causal=True,
                    scale=scale,
                    enable_gqa=True,
                )  # [1, H, n, D]
                out[row * row_len + start : row * row_len + end] = attended[0].transpose(0, 1)
        for chunk in self.chunks:
            keys, values = self.kv_cache.gather(layer, chunk.context_slots[None])  # [1, Hkv, S, D]
            attended = F.scaled_dot_product_attention(
                q[chunk.row : chunk.row + 1, :, chunk.start : chunk.end],
                keys,
                values,
                attn_mask=chunk.allowed,
                scale=scale,
                enable_gqa=True,
            )  # [1, H, n, D]
            flat = chunk.row * row_len
            out[flat + chunk.start : flat + chunk.end] = attended[0].transpose(0, 1)
        if self.decode is not None:
            flat_q = q.transpose(1, 2).reshape(rows * row_len, heads, dim)
            self.decode.attend(self.kv_cache, layer, flat_q, out, scale)
        return out.view(rows, row_len, heads, dim)


def packserve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packserve_meta: StepMetadata | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; returns ([B, T, H, D], no weights)."""
    if packserve_meta is None:
        raise RuntimeError("the packserve attention needs packserve_meta; run it through Runner")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer: int = module.layer_idx  # type: ignore[assignment]
    return packserve_meta.attend(layer, query, key, value, scale), None


AttentionInterface.register(ATTENTION_NAME, packserve_attention)
