"""Sibling projections that read one input computed by one GEMM (vLLM's fused QKV and
gate/up layers), without touching the model's code.

A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, then gate_proj and
up_proj on the same normed states. `fuse_shared_inputs` replaces each such group by
`ProjectionSlice` modules over one `SharedInputProjection`, whose weight is the members'
weights stacked: the first member called computes the whole output, each member returns its
columns, and the output is dropped once every member has taken its part. A member called on
another input (a model that does not call them back to back) computes the whole GEMM again:
slower, never wrong. On a CPU a decode step is bound by per-call overhead, so fewer, wider
GEMMs pay (bench/fused.py times both at the model's shapes: results/fused.md).

The fused weight can carry extra output rows after the members' (`set_extra`): LoRA's
shrink (x @ A^T for every adapter slot) then comes out of the same GEMM, and a hook
(`on_output`) adds the adapters' deltas in place before any member reads its columns.

Not used in batch-invariant mode: there each projection runs on fixed row tiles of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .linear import MIN_WEIGHT_ELEMENTS, PackedLinear, pack_weight, packed_linear

# Sibling projections that a decoder layer calls on one input, in the order it calls them.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FUSABLE = (nn.Linear, PackedLinear)


class SharedInputProjection:
    """The stacked GEMM of a group of projections: [W_1; ...; W_g; extra] (plus biases)."""

    def __init__(self, members: Sequence[nn.Linear | PackedLinear], pack: bool) -> None:
        """`members`: plain or packed linear layers with one input size; `pack`: use oneDNN's
        packed layout when the stacked weight is large enough to gain from it."""
        self.in_features: int = members[0].in_features
        self.out_features = [int(m.out_features) for m in members]
        self.offsets = [sum(self.out_features[:i]) for i in range(len(members))]
        self.width = sum(self.out_features)  # the members' columns; extra ones follow
        self.weight = torch.cat([m.weight.detach() for m in members])  # [width + extra, in]
        biases = [m.bias for m in members]
        self.bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    b.detach() if b is not None else self.weight.new_zeros(m.out_features)
                    for b, m in zip(biases, members, strict=True)
                ]
            )
        )
        self.pack = pack and self.weight.numel() >= MIN_WEIGHT_ELEMENTS
        self.packed = pack_weight(self.weight) if self.pack else None
        self.on_output: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self._input: torch.Tensor | None = None  # the input of the output held
        self._output: torch.Tensor | None = None
        self._served = 0  # members that took their columns of it

    def set_extra(self, rows: torch.Tensor) -> None:
        """Compute `x @ rows^T` too, as output columns past the members' ([extra, in])."""
        self.weight = torch.cat([self.weight[: self.width], rows])
        if self.bias is not None:
            self.bias = torch.cat([self.bias[: self.width], rows.new_zeros(len(rows))])
        if self.pack:
            self.packed = pack_weight(self.weight)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s output for input `x`: its columns of the stacked GEMM's output."""
        if self._input is not x or self._output is None:
            self._input, self._served = x, 0
            if self.packed is not None:
                self._output = packed_linear(x, self.packed, self.bias)
            else:
                self._output = F.linear(x, self.weight, self.bias)
            if self.on_output is not None:
                self.on_output(x, self._output)
        out = self._output
        self._served += 1
        if self._served == len(self.out_features):  # everyone has it: let it go
            self._input = self._output = None
        start = self.offsets[index]
        return out[..., start : start + self.out_features[index]]


class ProjectionSlice(nn.Module):
    """One member of a `SharedInputProjection`, in its projection's place in the model."""

    def __init__(self, shared: SharedInputProjection, index: int) -> None:
        super().__init__()
        self.shared = shared
        self.index = index
        self.in_features = shared.in_features
        self.out_features = shared.out_features[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.index)


def fuse_shared_inputs(model: nn.Module, pack: bool) -> list[SharedInputProjection]:
    """Replace each complete `SHARED_INPUTS` group of plain or packed linears (one input size,
    one dtype) under `model` by slices of one stacked GEMM, in place; the stacked GEMMs.
    `pack`: whether linear layers use oneDNN's packed weights on this machine."""
    fused = []
    for parent in list(model.modules()):
        for group in SHARED_INPUTS:
            found = [getattr(parent, name, None) for name in group]
            members = [m for m in found if isinstance(m, FUSABLE) and type(m) in FUSABLE]
            if len(members) < len(group):
                continue
            if len({(m.in_features, m.weight.dtype) for m in members}) != 1:
                continue
            shared = SharedInputProjection(members, pack)
            for index, name in enumerate(group):
                setattr(parent, name, ProjectionSlice(shared, index))
            fused.append(shared)
    return fused
