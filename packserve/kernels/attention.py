"""Attention for packed prefill and ragged decode, plugged into transformers' registry.

The model code stays unmodified: it computes Q/K/V and RoPE, then calls the function registered
as `packserve` with our per-step metadata in the `packserve_meta` keyword argument. That
function writes the new K/V into the paged pool and attends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kv_cache import KVCache

ATTENTION_NAME = "packserve"


@dataclass(frozen=True, slots=True)
class PrefillMetadata:
    """Packed rows: several prompts back to back per row, rows padded to the longest."""

    kv_cache: KVCache
    token_index: torch.Tensor  # [N] flat index (row * row_len + col) of each real token
    slot_mapping: torch.Tensor  # [N] cache slot of each real token
    segments: tuple[tuple[int, int, int], ...]  # (row, start, end) of each prompt
    mask: torch.Tensor | None  # [R, 1, L, L] additive block-diagonal causal mask (dense only)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # q: [R, H, L, D]; k, v: [R, Hkv, L, D]
        rows, _, row_len, _ = q.shape
        flat_k = k.transpose(1, 2).reshape(rows * row_len, k.shape[1], k.shape[3])  # [R*L, Hkv, D]
        flat_v = v.transpose(1, 2).reshape(rows * row_len, v.shape[1], v.shape[3])
        self.kv_cache.write(  # [N, Hkv, D] each
            layer, self.slot_mapping, flat_k[self.token_index], flat_v[self.token_index]
        )
        if self.mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=True
            )  # [R, H, L, D]
            return out.transpose(1, 2)  # [R, L, H, D]
        # varlen: each prompt attends only to itself; nothing is computed across prompts.
        out = q.new_zeros(q.shape)
        for row, start, end in self.segments:
            out[row : row + 1, :, start:end] = F.scaled_dot_product_attention(
                q[row : row + 1, :, start:end],
                k[row : row + 1, :, start:end],
                v[row : row + 1, :, start:end],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
        return out.transpose(1, 2)  # [R, L, H, D]


@dataclass(frozen=True, slots=True)
class DecodeBucket:
    """Batch rows [start, end) of a decode step, whose contexts are padded to one length."""

    start: int
    end: int
    context_slots: torch.Tensor  # [b, L] slots of each sequence's tokens, padded with slot 0
    # [b, 1, 1, L] additive: 0 within the sequence's length, -inf past it; None: all length L
    mask: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class DecodeMetadata:
    """One new token per sequence; each attends to its own cached tokens. The batch is ordered
    longest context first and cut into buckets of similar length, so gathering and attention
    cost about the real context tokens, not batch x longest context."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [B] cache slot of each new token
    buckets: tuple[DecodeBucket, ...]
    # Batch-invariant mode on CPU: attend on one thread. torch's CPU flash kernel parallelizes
    # a call differently when it holds fewer sequences than there are threads, which changes
    # a sequence's rounding with the number of sequences beside it (measured, torch 2.13);
    # on one thread every call takes the same path.
    single_thread: bool = False

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # q: [B, H, 1, D]; k, v: [B, Hkv, 1, D]
        self.kv_cache.write(layer, self.slot_mapping, k[:, :, 0], v[:, :, 0])
        if not self.single_thread:
            return self._attend(layer, q, scale)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._attend(layer, q, scale)
        finally:
            torch.set_num_threads(threads)

    def _attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        outs = []
        for bucket in self.buckets:
            keys, values = self.kv_cache.gather(layer, bucket.context_slots)  # [b, Hkv, L, D]
            outs.append(
                F.scaled_dot_product_attention(
                    q[bucket.start : bucket.end],
                    keys,
                    values,
                    attn_mask=bucket.mask,
                    scale=scale,
                    enable_gqa=True,
                )
            )  # [b, H, 1, D]
        return torch.cat(outs).transpose(1, 2)  # [B, 1, H, D]


def packserve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packserve_meta: PrefillMetadata | DecodeMetadata | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; returns ([B, T, H, D], no weights)."""
    if packserve_meta is None:
        raise RuntimeError("the packserve attention needs packserve_meta; run it through Runner")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer: int = module.layer_idx  # type: ignore[assignment]
    return packserve_meta.attend(layer, query, key, value, scale), None


AttentionInterface.register(ATTENTION_NAME, packserve_attention)
