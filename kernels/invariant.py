"""Batch-invariant execution: a token's numbers never depend on what else is in the step.

CPU kernels pick their blocking, vector tails and thread split from a tensor's shape, so the
same token computed in a batch of 1 or of 300 rows can round differently (GEMM kernels for
M=1 and M=64 reduce in different orders; an elementwise op's scalar tail covers different
elements). This module removes every such dependence for the parts of a decoder that work
token by token, without touching the model's code:

- `RowTiled` runs a per-token module (a linear layer, a whole MLP) on fixed tiles of
  `tile_rows` rows, the last tile padded with zeros. Every call has one shape, so the kernel,
  its reduction order and its thread split are the same for every token; a token's row inside
  a tile does not matter either (`row_tile_invariant` checks that contract on this machine).
- `TabulatedRotary` replaces the rotary embedding by a table computed once in fixed chunks of
  positions, so a position's cos/sin never depend on the other positions in the step.

Attention is made invariant by the runner instead: each prefill segment and each decode
sequence attends alone (varlen prefill, one decode bucket per sequence). What stays
shape-dependent is attention itself: a position computed in a prefill and the same position
computed by a decode step use different SDPA shapes, so preempted sequences are replayed
token by token (the scheduler's `replay_preempted`) rather than recomputed in one prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import PackedLinear

# Rows per tile. Small enough that a decode step of one sequence wastes little, large enough
# that prefill tiles keep the GEMM efficient; chosen by bench/batch_invariant.py.
DEFAULT_TILE_ROWS = 32
# Positions per chunk of the rotary table: every chunk is computed by one call of this shape.
ROTARY_CHUNK = 64
# Rotary variants whose cos/sin depend on the position alone (dynamic ones rescale with the
# sequence length, so they cannot be tabulated).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


class RowTiled(nn.Module):
    """`module` applied to fixed tiles of `tile_rows` rows of its input's last dimension."""

    def __init__(self, module: nn.Module, tile_rows: int) -> None:
        super().__init__()
        self.inner = module
        self.tile_rows = tile_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])  # [M, in]
        num_rows = rows.shape[0]
        pad = -num_rows % self.tile_rows
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])  # [M + pad, in]
        out = torch.cat([self.inner(tile) for tile in rows.split(self.tile_rows)])  # [M + pad, out]
        return out[:num_rows].reshape(*lead, out.shape[-1])


class TabulatedRotary(nn.Module):
    """A rotary embedding module's (cos, sin), looked up in a table of `num_positions`."""

    def __init__(self, rotary: nn.Module, num_positions: int) -> None:
        super().__init__()
        probe = torch.zeros(1, device=rotary.inv_freq.device)  # float32: the table's dtype
        cos, sin = [], []
        for start in range(0, num_positions, ROTARY_CHUNK):
            positions = torch.arange(start, start + ROTARY_CHUNK, device=probe.device)[None]
            c, s = rotary(probe, position_ids=positions)  # [1, ROTARY_CHUNK, D] each
            cos.append(c[0])
            sin.append(s[0])
        self.cos = torch.cat(cos)  # [num_positions rounded up to a chunk, D]
        self.sin = torch.cat(sin)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [R, L] -> cos, sin: [R, L, D] in x's dtype
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def make_batch_invariant(model: nn.Module, tile_rows: int, num_positions: int) -> None:
    """Wrap `model`'s per-token modules in `RowTiled` and tabulate its rotary embedding, in
    place. Each decoder layer's `mlp` is tiled whole (its activation then also sees one
    shape); every other linear layer, the LM head included, is tiled alone."""
    for parent in list(model.modules()):
        rotary = getattr(parent, "rotary_emb", None)
        if rotary is None:
            continue
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"batch-invariant mode cannot tabulate {rope_type!r} rotary embeddings"
            )
        parent.rotary_emb = TabulatedRotary(rotary, num_positions)
    _tile(model, tile_rows)


def _tile(module: nn.Module, tile_rows: int) -> None:
    for name, child in module.named_children():
        if name == "mlp" or isinstance(child, nn.Linear | PackedLinear):
            setattr(module, name, RowTiled(child, tile_rows))
        else:
            _tile(child, tile_rows)


def row_tile_invariant(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` gives each row of a [tile, in] input the same bits at every row
    position of the tile (rolled through all positions): the contract `RowTiled` relies on."""
    with torch.inference_mode():
        ref = module(x)
        return all(
            torch.equal(module(x.roll(shift, 0)).roll(-shift, 0), ref)
            for shift in range(1, x.shape[0])
        )
