"""Many LoRA adapters in one forward: a weight pool of `max_loras` slots per target projection
and, per token, its own adapter's delta added to the shared base GEMM: no merged adapters, no
forward per adapter, a fixed handful of ops per projection however many adapters the step
holds (the gathered / segmented matmul of Punica and S-LoRA). Per forward the runner gives
every token a slot (-1: the base model and pads; `LoRAPool.begin`). r is the highest rank the
pool holds; the pool is rank-major, so every slot's first r ranks of a projection's A are one
contiguous [r * max_loras, in] block (A_all), and of its B one [r * max_loras, out] (B_all).

- Shrink, h = x @ A_all^T: for plain and packed linears (off batch-invariant mode) A_all rides
  on the base GEMM as extra output rows (kernels/fused.py; siblings on one input share one
  GEMM), so it costs no call of its own. On a CPU a decode step is bound by per-call
  overhead: a small GEMM of its own costs about as much as the base GEMM's extra rows cost in
  all. Other linears (quantized) multiply by their own A_all.
- Expand, small forwards (decode steps; at most DENSE_MAX_ROWS rows): h masked to each
  token's own slot's columns, then one GEMM with B_all (block-diagonal over the siblings of a
  shared GEMM, added to all their columns at once).
- Expand, large forwards (prefills): each token's own r columns of h gathered, its adapter's
  tokens cut into pieces of `seg` rows, `h_pieces [P, seg, r] @ B[piece slots] [P, r, out]` as
  one `torch.bmm`, the deltas gathered back in row order and added to the output.
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

from packserve.kernels.fused import FUSABLE, ProjectionSlice, SharedInputProjection
from packserve.kernels.linear import PackedLinear, pack_weight, packed_linear, packs
from packserve.scheduler import ScheduledSequence

from .adapter import TARGET_MODULES, AdapterError, LoRAWeights

# Forwards of up to this many token rows take the dense expand (module docstring): its extra
# FLOPs (every slot's ranks for every row) stop mattering next to the op overhead below this.
DENSE_MAX_ROWS = 128


@dataclass(frozen=True, slots=True)
class Segments:
    """A forward's adapter tokens as equal pieces, for the batched expand."""

    columns: torch.Tensor  # [N, r] each token's own columns of h (base and pads: slot 0's)
    gather: torch.Tensor  # [P * seg] flat token row of each piece position (pads: row 0)
    real: torch.Tensor  # [P * seg, 1] 1 at positions holding a token, 0 at pads (pool dtype)
    # [N] each token row's piece position; base tokens and pads: a pad position (its delta is
    # 0). Deltas are gathered back in row order and added whole: index_add_ into a column
    # slice of the shared GEMM's output takes a slow scatter path (10x, measured).
    place: torch.Tensor
    slots: torch.Tensor  # [P] each piece's adapter slot
    seg: int  # tokens per piece


class LoRAStep:
    """The current forward's tokens grouped by adapter slot; the runner sets it per forward
    (through `LoRAPool.begin`), the projections read it."""

    def __init__(self, slot_ranks: list[int]) -> None:
        self.slot_ranks = slot_ranks  # slot -> its adapter's highest rank (the pool's list)
        self.version = 0  # bumped per forward: a wrapper restarts its tile count on a new one
        self.active = False  # some token of this forward uses an adapter
        self.rank = 0  # the pool's highest rank: the ranks of each slot h holds
        # Small untiled forwards: each token's slot as a 0/1 mask over h's columns,
        # [N, rank * max_loras] (rank-major) in the pool's dtype; `masks[g]`: g copies side
        # by side, for the h of g projections sharing a GEMM.
        self.masks: dict[int, torch.Tensor] = {}
        self.segments: Segments | None = None  # large untiled forwards
        self.columns: dict[int, torch.Tensor] = {}  # `segment_columns` by copies
        # Tiled forwards, per tile in call order: (slot, bool [T, 1] rows using it).
        self.tiles: list[list[tuple[int, torch.Tensor]]] = []
        self._masks_key: tuple[tuple[int, ...], int] | None = None  # what `masks` was built for

    def begin(self, slot_ids: Sequence[int], tile_rows: int | None, like: torch.Tensor) -> None:
        """Group the forward's tokens (flat [R * L] order, -1 for the base and for pads) by
        slot; `tile_rows`: the tile height the projections run on, None if untiled; `like`:
        a tensor of the pool's dtype and device."""
        self.version += 1
        rank = max(self.slot_ranks)
        dense = tile_rows is None and len(slot_ids) <= DENSE_MAX_ROWS
        key = (tuple(slot_ids), rank)
        if dense and self.masks and key == self._masks_key:
            return  # decode steps of one batch: the same slots, the same masks
        self.masks, self.segments, self.columns, self.tiles = {}, None, {}, []
        present = {s for s in slot_ids if s >= 0}
        self.active = bool(present)
        self.rank = rank
        if not present:
            return
        device = like.device
        ids = torch.tensor(slot_ids, device=device)  # [N]
        num_slots = len(self.slot_ranks)
        if dense:
            columns = torch.arange(self.width, device=device) % num_slots
            self.masks[1] = (ids[:, None] == columns[None, :]).to(like.dtype)  # [N, r * slots]
            self._masks_key = key
        elif tile_rows is None:
            self.segments = _segments(slot_ids, self.rank, num_slots, like)
        else:
            ids = torch.cat([ids, ids.new_full((-len(slot_ids) % tile_rows,), -1)])  # [N + pad]
            for tile in ids.split(tile_rows):
                in_tile = sorted(s for s in set(tile.tolist()) if s >= 0)
                self.tiles.append([(s, (tile == s)[:, None]) for s in in_tile])

    def mask(self, copies: int) -> torch.Tensor:
        """The dense mask repeated for the h of `copies` projections side by side."""
        if copies not in self.masks:
            self.masks[copies] = self.masks[1].repeat(1, copies)
        return self.masks[copies]

    @property
    def width(self) -> int:
        """Columns of one projection's h: every slot's first `rank` ranks."""
        return self.rank * len(self.slot_ranks)

    def segment_columns(self, copies: int) -> torch.Tensor:
        """Each token's own columns of the h of `copies` projections side by side,
        [N, copies * r]."""
        assert self.segments is not None
        if copies not in self.columns:
            own = self.segments.columns
            self.columns[copies] = torch.cat([own + i * self.width for i in range(copies)], 1)
        return self.columns[copies]


def _segments(slot_ids: Sequence[int], rank: int, num_slots: int, like: torch.Tensor) -> Segments:
    """Each adapter's tokens in pieces of `seg`: at most 2 pieces per adapter present, at most
    2 x the adapter tokens of rows in all (plus one piece of pads when base tokens need a pad
    position and there is none)."""
    rows: dict[int, list[int]] = {}
    for row, slot in enumerate(slot_ids):
        if slot >= 0:
            rows.setdefault(slot, []).append(row)
    seg = -(-sum(len(r) for r in rows.values()) // len(rows))
    gather: list[int] = []
    real: list[int] = []
    place = [-1] * len(slot_ids)
    slots: list[int] = []
    for slot, members in rows.items():
        for start in range(0, len(members), seg):
            piece = members[start : start + seg]
            for row in piece:
                place[row] = len(gather)
                gather.append(row)
            gather += [0] * (seg - len(piece))
            real += [1] * len(piece) + [0] * (seg - len(piece))
            slots.append(slot)
    if -1 in place:  # base tokens or pads: they take a pad position
        if 0 not in real:
            gather += [0] * seg
            real += [0] * seg
            slots.append(slots[0])
        pad = real.index(0)
        place = [pad if p < 0 else p for p in place]

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=like.device)

    ranks = torch.arange(rank, device=like.device) * num_slots  # h column of rank k, slot 0
    own = tensor([max(slot, 0) for slot in slot_ids])
    columns = ranks[None, :] + own[:, None]  # [N, r]
    mask = tensor(real).to(like.dtype)[:, None]
    return Segments(columns, tensor(gather), mask, tensor(place), tensor(slots), seg)


def _expand_segments(
    rows_out: torch.Tensor, h: torch.Tensor, b_all: torch.Tensor, step: LoRAStep, copies: int
) -> None:
    """rows_out [M, out] += each token's own columns of h [M, copies * r * slots] times its
    slot's rows of `b_all` ([copies * r * slots, out]: per copy rank-major; block-diagonal
    over the members of a shared GEMM), in place: one bmm over the pieces for all copies."""
    s = step.segments
    assert s is not None
    ranks, out_features = copies * step.rank, rows_out.shape[1]
    own = h.gather(1, step.segment_columns(copies)).index_select(0, s.gather).mul_(s.real)
    own = own.view(-1, s.seg, ranks)  # [P, seg, copies * r], pads zeroed
    b = b_all.view(ranks, -1, out_features).index_select(1, s.slots).transpose(0, 1)
    deltas = torch.bmm(own, b).view(-1, out_features)  # [P * seg, out]
    rows_out.add_(deltas.index_select(0, s.place))


class LoRAWeightPool:
    """One projection's adapter weights, `max_rank` ranks per slot, rank-major:
    A [max_rank, max_loras, in], B^T * scaling [max_rank, max_loras, out]."""

    def __init__(
        self, in_features: int, out_features: int, max_loras: int, max_rank: int, like: torch.Tensor
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.a = like.new_zeros(max_rank, max_loras, in_features)
        self.b = like.new_zeros(max_rank, max_loras, out_features)

    def write(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put an adapter's (A [r, in], scaled B [out, r]) into `slot`, zeros past its rank;
        None: it leaves this projection alone (all zeros)."""
        self.a[:, slot].zero_()
        self.b[:, slot].zero_()
        if pair is None:
            return
        a, b = pair
        rank = a.shape[0]
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise AdapterError(
                f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                f"{self.in_features} -> {self.out_features} projection"
            )
        self.a[:rank, slot] = a
        self.b[:rank, slot] = b.T

    def a_all(self, rank: int) -> torch.Tensor:
        return self.a[:rank].view(-1, self.in_features)  # [rank * slots, in]

    def b_all(self, rank: int) -> torch.Tensor:
        return self.b[:rank].view(-1, self.out_features)  # [rank * slots, out]


class LoRALinear(nn.Module):
    """A projection (one LoRA cannot ride on: quantized, or tiled in batch-invariant mode)
    plus, per token, the low-rank update of that token's adapter slot."""

    def __init__(self, base: nn.Module, step: LoRAStep, weights: LoRAWeightPool) -> None:
        super().__init__()
        self.base = base
        self.step = step
        self.weights = weights
        self.in_features, self.out_features = weights.in_features, weights.out_features
        self._version = -1
        self._tile = 0  # the next tile of the current forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = self.step
        if not step.active:
            return out
        rows = x.reshape(-1, self.in_features)  # [M, in]
        rows_out = out.view(-1, self.out_features)  # [M, out], written in place
        if step.tiles:
            self._tiled(rows, rows_out)
            return out
        h = torch.mm(rows, self.weights.a_all(step.rank).T)  # [M, r * slots]
        if step.segments is None:
            rows_out.addmm_(h.mul_(step.mask(1)), self.weights.b_all(step.rank))
        else:
            _expand_segments(rows_out, h, self.weights.b_all(step.rank), step, 1)
        return out

    def _tiled(self, rows: torch.Tensor, rows_out: torch.Tensor) -> None:
        """One fixed tile: each adapter's delta over the whole tile, other rows zeroed."""
        step = self.step
        if self._version != step.version:
            self._version, self._tile = step.version, 0
        groups = step.tiles[self._tile]
        self._tile += 1
        for slot, sel in groups:  # sel: bool [T, 1]; one shape per adapter, any tile
            rank = step.slot_ranks[slot]
            a, bt = self.weights.a[:rank, slot], self.weights.b[:rank, slot]  # [r, in], [r, out]
            rows_out += torch.where(sel, rows, 0) @ a.T @ bt


class SharedLoRA:
    """LoRA on a `SharedInputProjection`: its extra output rows are the members' A_all (h),
    and on each output it adds every token's delta to the members' columns."""

    def __init__(
        self, shared: SharedInputProjection, step: LoRAStep, weights: list[LoRAWeightPool]
    ) -> None:
        self.shared = shared
        self.step = step
        self.weights = weights
        self.b_all = weights[0].b.new_zeros(0, shared.width)  # block-diagonal over members
        self.b_packed: torch.Tensor | None = None  # b_all^T in oneDNN's layout, if packed
        # The dense expand (bench/fused.py, results/fused.md): in bfloat16 one oneDNN GEMM
        # with the block-diagonal B packed beats torch's addmm_; in float32 torch's addmm_
        # per member beats both.
        b = weights[0].b
        self._packs_b = b.device.type == "cpu" and b.dtype == torch.bfloat16 and packs(b.dtype)
        shared.on_output = self.add_deltas

    def rebuild(self, rank: int) -> None:
        """Take the pool's current weights at `rank` (after a slot is written)."""
        self.shared.set_extra(torch.cat([w.a_all(rank) for w in self.weights]))
        width = rank * self.weights[0].a.shape[1]  # h columns of one member
        self.b_all = self.b_all.new_zeros(width * len(self.weights), self.shared.width)
        for i, (w, start) in enumerate(zip(self.weights, self.shared.offsets, strict=True)):
            self.b_all[i * width : (i + 1) * width, start : start + w.out_features] = w.b_all(rank)
        self.b_packed = pack_weight(self.b_all.T.contiguous()) if self._packs_b and rank else None

    def add_deltas(self, x: torch.Tensor, y: torch.Tensor) -> None:
        step = self.step
        if not step.active:
            return
        rows = y.view(-1, y.shape[-1])
        shared = self.shared
        h = rows[:, shared.width :]  # [M, members * r * slots]
        if step.segments is None:
            masked = h.mul(step.mask(len(self.weights)))
            if self.b_packed is not None:
                rows[:, : shared.width].add_(packed_linear(masked, self.b_packed))
                return
            width = step.width
            for i, (w, start) in enumerate(zip(self.weights, shared.offsets, strict=True)):
                rows[:, start : start + w.out_features].addmm_(
                    masked[:, i * width : (i + 1) * width], w.b_all(step.rank)
                )
            return
        _expand_segments(rows[:, : shared.width], h, self.b_all, step, len(self.weights))


class LoRAPool:
    """The adapter slots of a model: the weights of each target projection of its decoder,
    which takes them on its GEMM (`SharedLoRA`) or in a `LoRALinear` wrapper (in place), and
    which a slot at a time is written between steps. `merge`: let plain and packed linears
    carry the shrink on their GEMM (not in batch-invariant mode, where each GEMM keeps its
    own shape)."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, merge: bool) -> None:
        self.slot_ranks = [0] * max_loras  # slot -> highest rank of the adapter it holds
        self.step = LoRAStep(self.slot_ranks)
        self.max_loras = max_loras
        self.max_rank = max_rank
        like = next(model.parameters())
        self._like = like.new_empty(0)  # the pool's dtype and device
        self.layers: dict[str, LoRAWeightPool] = {}  # module name (as PEFT keys it) -> weights
        self.shared: list[SharedLoRA] = []
        on_shared: dict[int, tuple[SharedInputProjection, dict[int, LoRAWeightPool]]] = {}
        for parent_name, parent in model.named_modules():
            for name, child in list(parent.named_children()):
                if name not in TARGET_MODULES:
                    continue
                weights = LoRAWeightPool(
                    child.in_features, child.out_features, max_loras, max_rank, like
                )
                self.layers[f"{parent_name}.{name}".lstrip(".")] = weights
                if merge and type(child) in FUSABLE:  # a shared GEMM of its own
                    packed = isinstance(child, PackedLinear)
                    child = ProjectionSlice(SharedInputProjection([child], packed), 0)
                    setattr(parent, name, child)
                if merge and isinstance(child, ProjectionSlice):
                    entry = on_shared.setdefault(id(child.shared), (child.shared, {}))
                    entry[1][child.index] = weights
                else:
                    setattr(parent, name, LoRALinear(child, self.step, weights))
        for shared, members in on_shared.values():
            assert len(members) == len(shared.out_features)  # SHARED_INPUTS are all targets
            self.shared.append(SharedLoRA(shared, self.step, [members[i] for i in sorted(members)]))
        self._stale = True  # the shared GEMMs lack the pool's current weights

    def begin(self, slot_ids: Sequence[int], tile_rows: int | None) -> None:
        """Set up a forward: each token's slot (see `LoRAStep.begin`)."""
        if self._stale:  # slots written since the last forward: one rebuild for all of them
            self._rebuild()
        self.step.begin(slot_ids, tile_rows, self._like)

    def write(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot` (between steps). Raises AdapterError, leaving the slot
        unusable until written again, if it names a module the model lacks or shapes that do
        not fit."""
        unknown = sorted(set(weights.modules) - set(self.layers))
        if unknown:
            raise AdapterError(f"the model has no module {unknown[0]} (of {len(unknown)})")
        self.slot_ranks[slot] = weights.max_rank
        self._stale = True
        for name, layer in self.layers.items():
            layer.write(slot, weights.modules.get(name))

    def _rebuild(self) -> None:
        """Give the shared GEMMs the pool's current weights (repacking them)."""
        for shared in self.shared:
            shared.rebuild(max(self.slot_ranks))
        self._stale = False


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
