"""Linear layers on oneDNN with prepacked weights, for float32 and bfloat16 on CPU.

torch's default CPU GEMM for float32 (MKL) and oneDNN with a weight packed once into its
blocked layout differ a lot on some CPUs: on this project's 2-core AMD EPYC machine,
measured by bench/gemm.py, MKL reaches about 220 GFLOP/s and oneDNN 400-560. The model code
stays as it is: `pack_linears` swaps each large `nn.Linear` module for a `PackedLinear` that keeps
the same weight parameter (so state dicts, tying and dtype checks see what they expect) and
multiplies with its packed copy.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Below this many weights a layer stays as it is: oneDNN's ~10 us per call outweighs its faster
# GEMM there, and its worker threads then compete with the server's event loop (measured on
# the tiny model: per-token latency at concurrency 1 went from 2.5 to 3.9 ms with all packed).
MIN_WEIGHT_ELEMENTS = 1 << 18


def can_pack(model: nn.Module) -> bool:
    """oneDNN is built in, and the model lives on the CPU in a dtype it packs on this CPU."""
    param = next(model.parameters())
    return param.device.type == "cpu" and packs(param.dtype)


@cache
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU, tried on a small one: its bfloat16
    path needs AVX512-BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only Zen 3 refuses it)."""
    if not torch.backends.mkldnn.is_available() or dtype not in PACKABLE_DTYPES:
        return False
    try:
        pack_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of an [out, in] weight, for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed by oneDNN from `pack_weight(weight)`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`nn.Linear` computed by oneDNN from a prepacked copy of the weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = pack_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def pack_linears(model: nn.Module, min_weight_elements: int = MIN_WEIGHT_ELEMENTS) -> int:
    """Swap every `nn.Linear` of `model` with at least `min_weight_elements` weights for a
    `PackedLinear`, in place; how many were swapped."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.numel() >= min_weight_elements
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
