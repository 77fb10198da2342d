"""Batch-invariant execution: a token's numbers never depend on what else is in the step.

Kernels pick their blocking, vector tails and thread split from a tensor's shape, so the
same token computed in a batch of 1 or of 300 rows can round differently (GEMM kernels for
M=1 and M=64 reduce in different orders; an elementwise op's scalar tail covers different
elements). This module removes every such dependence for the parts of a decoder that work
token by token, without touching the model's code:

- `RowTiled` runs a per-token module (a linear layer, a norm, a whole MLP) on fixed row tiles,
  the last tile padded with zeros. Every call has one shape, so the kernel, its reduction
  order and its thread split are the same for every token; a token's row inside a tile does
  not matter either (tests/kernels/test_batch_invariant.py checks that on the machine). Prefill
  forwards use tall tiles (GEMM efficiency), decode forwards short ones (a decode batch is
  small): a token's tile height depends on its phase, never on its batch. The LM head always
  runs on short tiles: it only sees the rows that are sampled.
- `TabulatedRotary` replaces the rotary embedding by a table computed once in fixed chunks of
  positions, so a position's cos/sin never depend on the other positions in the step.

Attention is made invariant by the runner instead: each prefill segment attends alone
(varlen); each decode sequence attends over its context rounded up to a fixed multiple,
masked past its length, batched only with sequences of the same rounded length, on one
thread (where the CPU flash kernel computes each sequence alike whatever the batch). A
position computed in a prefill and the same position computed by a decode step still use
different attention shapes, so preempted sequences are replayed token by token (the
scheduler's `replay_preempted`) rather than recomputed in one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .linear import PackedLinear
from .lora import LoRALinear

# Rows per tile: prefill tiles tall enough to keep the GEMMs efficient, decode tiles short
# enough that small batches waste little (measured, SmolLM2-135M, batch-16 decode step on a
# 2-core AMD EPYC: 16 rows 202 ms, 32 rows 239 ms, 64 rows 275 ms).
DEFAULT_PREFILL_TILE_ROWS = 128
DEFAULT_DECODE_TILE_ROWS = 16
# Decode attention pads each context to a multiple of this many keys (inputs.decode_inputs),
# so sequences of similar length share one attention call.
DEFAULT_DECODE_CONTEXT_PAD = 64
# Batch-invariant prefill runs in chunks of this many tokens, at fixed positions (the
# scheduler's chunk_align): a prompt is computed in the same pieces whatever the step holds,
# and the prefix cache reuses whole chunks only.
INVARIANT_PREFILL_CHUNK = 256
# Positions per chunk of the rotary table: every chunk is computed by one call of this shape.
ROTARY_CHUNK = 64
# Rotary variants whose cos/sin depend on the position alone (dynamic ones rescale with the
# sequence length, so they cannot be tabulated).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


@dataclass(slots=True)
class TileRows:
    """The tile height of a group of `RowTiled` modules; the runner sets it per forward."""

    rows: int


class RowTiled(nn.Module):
    """`module` applied to fixed tiles of `tiles.rows` rows of its input's last dimension."""

    def __init__(self, module: nn.Module, tiles: TileRows) -> None:
        super().__init__()
        self.inner = module
        self.tiles = tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, height = x.shape[:-1], self.tiles.rows
        rows = x.reshape(-1, x.shape[-1])  # [M, in]
        num_rows = rows.shape[0]
        pad = -num_rows % height
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])  # [M + pad, in]
        out = torch.cat([self.inner(tile) for tile in rows.split(height)])  # [M + pad, out]
        return out[:num_rows].reshape(*lead, out.shape[-1])


class TabulatedRotary(nn.Module):
    """A rotary embedding module's (cos, sin), looked up in a table of `num_positions`."""

    def __init__(self, rotary: nn.Module, num_positions: int) -> None:
        super().__init__()
        device = rotary.get_buffer("inv_freq").device
        probe = torch.zeros(1, device=device)  # float32: the table's dtype
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


def make_batch_invariant(model: PreTrainedModel, decode_rows: int, num_positions: int) -> TileRows:
    """Wrap `model`'s per-token modules in `RowTiled` and tabulate its rotary embedding, in
    place. Each decoder layer's `mlp` is tiled whole (its activation then also sees one
    shape); every other linear layer and every norm is tiled alone. The decoder's tiles share
    the returned height (set it per forward); the LM head's is `decode_rows` always."""
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
    model.set_output_embeddings(RowTiled(model.get_output_embeddings(), TileRows(decode_rows)))
    tiles = TileRows(decode_rows)
    _tile(model.get_decoder(), tiles)
    return tiles


def _tile(module: nn.Module, tiles: TileRows) -> None:
    for name, child in module.named_children():
        per_token = name == "mlp" or name.endswith("norm")  # norms reduce over a row
        if per_token or isinstance(child, nn.Linear | PackedLinear | LoRALinear):
            setattr(module, name, RowTiled(child, tiles))
        else:
            _tile(child, tiles)
