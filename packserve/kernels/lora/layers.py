"""Many LoRA adapters in one forward: a weight pool of `max_loras` slots and a wrapper on each
target projection that adds every token's own adapter delta to the shared base GEMM: no merged
weights, no forward per adapter, a fixed handful of ops per projection however many adapters
the step holds (the gathered / segmented matmul of Punica and S-LoRA). Per forward the runner
gives every token a slot (-1: the base model and pads; `LoRAPool.begin`); a forward without
adapter tokens runs the base projections alone. r is the highest rank of the adapters present.

- Small forwards (decode steps; at most DENSE_MAX_ROWS rows): `(x @ A_all^T * mask) @ B_all`
  with A_all, B_all every slot's first r ranks stacked ([r * max_loras, features], contiguous
  in the rank-major pool) and the mask keeping each token's own slot's columns: two GEMMs and
  a multiply. On a CPU such a step is bound by op overhead and weight reads (all resident
  adapters' weights are read anyway when they all take part), not by FLOPs.
- Large forwards (prefills): each adapter's tokens cut into pieces of `seg` rows, and
  `x_pieces [P, seg, in] @ A[piece slots] [P, in, r] @ B[piece slots] [P, r, out]` as two
  `torch.bmm`, the real rows index-added into the output: FLOPs within 2x of the adapters'
  own.
- Batch-invariant mode: the runner tiles every projection (kernels/invariant.py), so a wrapper
  sees one fixed tile of rows per call, in order; for each adapter present in the tile the
  delta is computed on the whole tile with the other rows zeroed (`where`, exact), so its
  GEMMs have one shape whatever the tile holds, and the rows of other adapters get exactly +0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from packserve.scheduler import ScheduledSequence

from .adapter import TARGET_MODULES, AdapterError, LoRAWeights

# Forwards of up to this many token rows take the dense path (module docstring): its extra
# FLOPs (every slot's ranks for every row) stop mattering next to the op overhead below this.
DENSE_MAX_ROWS = 128


@dataclass(frozen=True, slots=True)
class Segments:
    """A forward's adapter tokens as equal pieces, for the batched path."""

    gather: torch.Tensor  # [P * seg] flat token row of each piece position (pads: row 0)
    keep: torch.Tensor  # [n] positions in [P * seg] holding real tokens
    dest: torch.Tensor  # [n] their token rows (distinct): where the deltas are added
    slots: torch.Tensor  # [P] each piece's adapter slot
    seg: int  # tokens per piece


class LoRAStep:
    """The current forward's tokens grouped by adapter slot; the runner sets it per forward
    (through `LoRAPool.begin`), the wrappers read it."""

    def __init__(self, slot_ranks: list[int]) -> None:
        self.slot_ranks = slot_ranks  # slot -> its adapter's highest rank (the pool's list)
        self.version = 0  # bumped per forward: a wrapper restarts its tile count on a new one
        self.active = False  # some token of this forward uses an adapter
        self.rank = 0  # the highest rank among the adapters present: pool ranks used
        # Small untiled forwards: each token's slot as a 0/1 mask over the pool's first
        # `rank` ranks of every slot, [N, rank * max_loras] (rank-major) in the pool's dtype.
        self.dense: torch.Tensor | None = None
        self.segments: Segments | None = None  # large untiled forwards
        # Tiled forwards, per tile in call order: (slot, bool [T, 1] rows using it).
        self.tiles: list[list[tuple[int, torch.Tensor]]] = []

    def begin(self, slot_ids: Sequence[int], tile_rows: int | None, like: torch.Tensor) -> None:
        """Group the forward's tokens (flat [R * L] order, -1 for the base and for pads) by
        slot; `tile_rows`: the tile height the projections run on, None if untiled; `like`:
        a tensor of the pool's dtype and device."""
        self.version += 1
        self.dense, self.segments, self.tiles = None, None, []
        present = {s for s in slot_ids if s >= 0}
        self.active = bool(present)
        if not present:
            return
        self.rank = max(self.slot_ranks[s] for s in present)
        device = like.device
        ids = torch.tensor(slot_ids, device=device)  # [N]
        if tile_rows is None and len(slot_ids) <= DENSE_MAX_ROWS:
            num_slots = len(self.slot_ranks)
            columns = torch.arange(self.rank * num_slots, device=device) % num_slots
            self.dense = (ids[:, None] == columns[None, :]).to(like.dtype)  # [N, r * slots]
        elif tile_rows is None:
            self.segments = _segments(slot_ids, device)
        else:
            ids = torch.cat([ids, ids.new_full((-len(slot_ids) % tile_rows,), -1)])  # [N + pad]
            for tile in ids.split(tile_rows):
                in_tile = sorted(s for s in set(tile.tolist()) if s >= 0)
                self.tiles.append([(s, (tile == s)[:, None]) for s in in_tile])


def _segments(slot_ids: Sequence[int], device: torch.device) -> Segments:
    """Each adapter's tokens in pieces of `seg`: at most 2 pieces per adapter present, at most
    2 x the adapter tokens of rows in all."""
    rows: dict[int, list[int]] = {}
    for row, slot in enumerate(slot_ids):
        if slot >= 0:
            rows.setdefault(slot, []).append(row)
    seg = -(-sum(len(r) for r in rows.values()) // len(rows))
    gather: list[int] = []
    keep: list[int] = []
    dest: list[int] = []
    slots: list[int] = []
    for slot, members in rows.items():
        for start in range(0, len(members), seg):
            piece = members[start : start + seg]
            keep += range(len(gather), len(gather) + len(piece))
            dest += piece
            gather += piece + [0] * (seg - len(piece))
            slots.append(slot)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return Segments(tensor(gather), tensor(keep), tensor(dest), tensor(slots), seg)


class LoRALinear(nn.Module):
    """A projection plus, per token, the low-rank update of that token's adapter slot.

    The pool is rank-major, [max_rank, max_loras, features]: the first r ranks of every slot
    are one contiguous [r * max_loras, features] block, what the dense path multiplies by."""

    def __init__(
        self, base: nn.Module, step: LoRAStep, max_loras: int, max_rank: int, like: torch.Tensor
    ) -> None:
        """`like`: a tensor of the model's dtype and device, which the pool takes."""
        super().__init__()
        self.base = base
        self.step = step
        self.in_features: int = getattr(base, "in_features")  # noqa: B009  # any linear kind
        self.out_features: int = getattr(base, "out_features")  # noqa: B009
        self.lora_a = like.new_zeros(max_rank, max_loras, self.in_features)  # A
        self.lora_b = like.new_zeros(max_rank, max_loras, self.out_features)  # B^T * scaling
        self._version = -1
        self._tile = 0  # the next tile of the current forward

    def write(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put an adapter's (A [r, in], scaled B [out, r]) into `slot`, zeros past its rank;
        None: it leaves this projection alone (all zeros)."""
        self.lora_a[:, slot].zero_()
        self.lora_b[:, slot].zero_()
        if pair is None:
            return
        a, b = pair
        rank = a.shape[0]
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise AdapterError(
                f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                f"{self.in_features} -> {self.out_features} projection"
            )
        self.lora_a[:rank, slot] = a
        self.lora_b[:rank, slot] = b.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = self.step
        if not step.active:
            return out
        rows = x.reshape(-1, self.in_features)  # [M, in]
        rows_out = out.view(-1, self.out_features)  # [M, out], written in place
        r = step.rank
        if step.dense is not None:  # every slot's first r ranks, masked to each token's slot
            a = self.lora_a[:r].view(-1, self.in_features)  # [r * slots, in]
            b = self.lora_b[:r].view(-1, self.out_features)  # [r * slots, out]
            rows_out.addmm_(torch.mm(rows, a.T).mul_(step.dense), b)
        elif step.segments is not None:
            s = step.segments
            pieces = rows.index_select(0, s.gather).view(-1, s.seg, self.in_features)
            a = self.lora_a[:r].index_select(1, s.slots).permute(1, 2, 0)  # [P, in, r]
            bt = self.lora_b[:r].index_select(1, s.slots).transpose(0, 1)  # [P, r, out]
            delta = torch.bmm(torch.bmm(pieces, a), bt)  # [P, seg, out]
            real = delta.view(-1, self.out_features).index_select(0, s.keep)  # [n, out]
            rows_out.index_add_(0, s.dest, real)
        else:
            if self._version != step.version:
                self._version, self._tile = step.version, 0
            groups = step.tiles[self._tile]
            self._tile += 1
            for slot, sel in groups:  # sel: bool [T, 1]; one shape per adapter, any tile
                rank = step.slot_ranks[slot]
                a, bt = self.lora_a[:rank, slot], self.lora_b[:rank, slot]  # [r, in], [r, out]
                rows_out += torch.where(sel, rows, 0) @ a.T @ bt
        return out


class LoRAPool:
    """The adapter slots of a model: a `LoRALinear` around each target projection of its
    decoder (wrapped in place), written a slot at a time between steps."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        self.slot_ranks = [0] * max_loras  # slot -> highest rank of the adapter it holds
        self.step = LoRAStep(self.slot_ranks)
        self.max_loras = max_loras
        self.max_rank = max_rank
        like = next(model.parameters())
        self._like = like.new_empty(0)  # the pool's dtype and device
        self.layers: dict[str, LoRALinear] = {}  # module name (as PEFT keys it) -> wrapper
        targets = [
            (f"{parent_name}.{name}".lstrip("."), parent, name, child)
            for parent_name, parent in model.named_modules()
            for name, child in parent.named_children()
            if name in TARGET_MODULES
        ]
        for full_name, parent, name, child in targets:
            layer = LoRALinear(child, self.step, max_loras, max_rank, like)
            setattr(parent, name, layer)
            self.layers[full_name] = layer

    def begin(self, slot_ids: Sequence[int], tile_rows: int | None) -> None:
        """Set up a forward: each token's slot (see `LoRAStep.begin`)."""
        self.step.begin(slot_ids, tile_rows, self._like)

    def write(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot` (between steps). Raises AdapterError, leaving the slot
        unusable until written again, if it names a module the model lacks or shapes that do
        not fit."""
        unknown = sorted(set(weights.modules) - set(self.layers))
        if unknown:
            raise AdapterError(f"the model has no module {unknown[0]} (of {len(unknown)})")
        self.slot_ranks[slot] = weights.max_rank
        for name, layer in self.layers.items():
            layer.write(slot, weights.modules.get(name))


def token_slots(
    rows: Sequence[Sequence[ScheduledSequence]], slot_of: Mapping[str, int]
) -> list[int]:
    """Each token's adapter slot in a packed forward's flat [R * L] order (kernels/inputs.py's
    layout: segments back to back, rows padded to the longest); -1 for the base and pads."""
    row_len = max(sum(seq.num_tokens for seq in row) for row in rows)
    slots: list[int] = []
    for row in rows:
        for seq in row:
            slots += [slot_of[seq.request_id]] * seq.num_tokens
        slots += [-1] * (row_len - sum(seq.num_tokens for seq in row))
    return slots
