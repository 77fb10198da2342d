"""The KV cache tensors: one preallocated pool per layer, indexed by the scheduler's block ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape of the pool, read off the model config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def num_blocks_for(self, memory_bytes: int) -> int:
        """How many blocks a memory budget holds."""
        return memory_bytes // self.bytes_per_block


class KVCache:
    """Preallocated K and V pools. A token at slot s lives at `k[layer, s]`, where
    s = block_id * block_size + position % block_size."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_layers, num_blocks * spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)  # [layers, slots, Hkv, D]
        self.v = torch.zeros(shape, dtype=spec.dtype, device=device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of tokens: slots [N], k and v [N, Hkv, D]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at slots [B, L], returned as [B, Hkv, L, D] each."""
        b, n = slots.shape
        flat = slots.reshape(-1)
        k = self.k[layer].index_select(0, flat).view(b, n, *self.k.shape[2:])  # [B, L, Hkv, D]
        v = self.v[layer].index_select(0, flat).view(b, n, *self.v.shape[2:])
        return k.transpose(1, 2), v.transpose(1, 2)
