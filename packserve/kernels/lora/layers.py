"""Many LoRA adapters in one forward: a weight pool of `max_loras` slots and a wrapper on each
target projection that adds every token's own adapter delta to the shared base GEMM.

Per forward, the runner gives every token a slot (-1: the base model; `LoRAStep.begin`); the
tokens are grouped by slot once, and each wrapped projection then runs, per adapter present,
`(x[tokens] @ A^T) @ (B^T * scaling)` and index-adds it into the base output: at most
`max_loras` pairs of small GEMMs a projection (the gathered / segmented matmul of Punica and
S-LoRA), never a merged weight or a forward per adapter. A forward without adapter tokens runs
the base projection alone.

Batch-invariant mode: the runner tiles every projection (kernels/invariant.py), so a wrapper
sees one fixed tile of rows per call, in order; for each adapter present in the tile the delta
is computed on the whole tile with the other rows zeroed (`where`, exact), so its GEMMs have
one shape whatever the tile holds, and the rows of other adapters get exactly +0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from packserve.scheduler import ScheduledSequence

from .adapter import TARGET_MODULES, AdapterError, LoRAWeights

# slot -> the rows of a tile that use it: long indices [n] (gathered mode) or bool [T, 1]
# (batch-invariant mode)
Groups = list[tuple[int, torch.Tensor]]


class LoRAStep:
    """The current forward's tokens grouped by adapter slot; the runner sets it per forward,
    the wrappers read it."""

    def __init__(self) -> None:
        self.version = 0  # bumped per forward: a wrapper restarts its tile count on a new one
        self.active = False  # some token of this forward uses an adapter
        self.tiled = False  # wrappers are called on fixed tiles (batch-invariant mode)
        self.tiles: list[Groups] = []  # per tile, in call order (one tile when not tiled)

    def begin(self, slot_ids: Sequence[int], tile_rows: int | None, device: torch.device) -> None:
        """Group the forward's tokens (flat [R * L] order, -1 for the base and for pads) by
        slot; `tile_rows`: the tile height the projections run on, None if untiled."""
        self.version += 1
        self.active = any(s >= 0 for s in slot_ids)
        self.tiled = tile_rows is not None
        self.tiles = []
        if not self.active:
            return
        ids = torch.tensor(slot_ids, device=device)  # [N]
        if tile_rows is None:
            self.tiles.append(
                [(s, (ids == s).nonzero().flatten()) for s in sorted(set(slot_ids)) if s >= 0]
            )
            return
        pad = -len(slot_ids) % tile_rows
        ids = torch.cat([ids, ids.new_full((pad,), -1)])  # [N + pad]
        for tile in ids.split(tile_rows):
            present = sorted(s for s in set(tile.tolist()) if s >= 0)
            self.tiles.append([(s, (tile == s)[:, None]) for s in present])


class LoRALinear(nn.Module):
    """A projection plus, per token, the low-rank update of that token's adapter slot."""

    def __init__(
        self, base: nn.Module, step: LoRAStep, max_loras: int, max_rank: int, like: torch.Tensor
    ) -> None:
        """`like`: a tensor of the model's dtype and device, which the pool takes."""
        super().__init__()
        self.base = base
        self.step = step
        self.in_features: int = getattr(base, "in_features")  # noqa: B009  # any linear kind
        self.out_features: int = getattr(base, "out_features")  # noqa: B009
        self.lora_a = like.new_zeros(max_loras, max_rank, self.in_features)  # A
        self.lora_b = like.new_zeros(max_loras, max_rank, self.out_features)  # B^T * scaling
        self.ranks = [0] * max_loras  # slot -> its adapter's rank here; 0: not targeted
        self._version = -1
        self._tile = 0  # the next tile of the current forward

    def write(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put an adapter's (A [r, in], scaled B [out, r]) into `slot`; None: it leaves this
        projection alone."""
        if pair is None:
            self.ranks[slot] = 0
            return
        a, b = pair
        rank = a.shape[0]
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise AdapterError(
                f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                f"{self.in_features} -> {self.out_features} projection"
            )
        self.lora_a[slot, :rank] = a
        self.lora_b[slot, :rank] = b.T
        self.ranks[slot] = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = self.step
        if not step.active:
            return out
        if self._version != step.version:
            self._version, self._tile = step.version, 0
        groups = step.tiles[self._tile]
        self._tile += 1
        rows = x.reshape(-1, self.in_features)  # [M, in]
        rows_out = out.view(-1, self.out_features)  # [M, out], written in place
        for slot, sel in groups:
            rank = self.ranks[slot]
            if not rank:
                continue
            a, bt = self.lora_a[slot, :rank], self.lora_b[slot, :rank]  # [r, in], [r, out]
            if step.tiled:  # sel: bool [T, 1]; one shape per adapter, whatever the tile holds
                rows_out += torch.where(sel, rows, 0) @ a.T @ bt
            else:  # sel: the rows using this slot, [n]
                rows_out.index_add_(0, sel, rows.index_select(0, sel) @ a.T @ bt)
        return out


class LoRAPool:
    """The adapter slots of a model: a `LoRALinear` around each target projection of its
    decoder (wrapped in place), written a slot at a time between steps."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        self.step = LoRAStep()
        self.max_loras = max_loras
        self.max_rank = max_rank
        like = next(model.parameters())
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

    def write(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot` (between steps). Raises AdapterError, leaving the slot
        unusable until written again, if it names a module the model lacks or shapes that do
        not fit."""
        unknown = sorted(set(weights.modules) - set(self.layers))
        if unknown:
            raise AdapterError(f"the model has no module {unknown[0]} (of {len(unknown)})")
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
