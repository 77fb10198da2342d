"""RMSNorm in one C++ pass per row (native.py's `rms_norm`), swapped in for transformers' own
module without touching the model's code.

Llama-family models (Llama, SmolLM2, Qwen2 and 3, Mistral) normalize with a module computing
weight * (x * rsqrt(mean(x^2) + eps)).to(x's dtype), mean in float32: eight torch operators,
each a pass over the hidden states, twice a layer. `swap_rms_norms` replaces those modules by
`NativeRMSNorm`, which computes the same in one pass. A class is swapped only once its first
module has been run both ways on random rows and agreed to its dtype's rounding; another
formula under a known name keeps its own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .native import RMSNormKernel

NORM_CLASSES = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' formula, in torch operators."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class NativeRMSNorm(nn.Module):
    """The norm's weight and epsilon, computed by the C++ kernel (inputs in another dtype than
    the weight's: by torch, as transformers would)."""

    def __init__(self, weight: nn.Parameter, eps: float, kernel: RMSNormKernel) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return reference_rms_norm(x, self.weight, self.eps)
        return self.kernel(x, self.weight, self.eps)


def swap_rms_norms(model: nn.Module, kernel: RMSNormKernel) -> int:
    """Replace every module of a known RMSNorm class whose output the kernel reproduces, in
    place; returns how many were replaced."""
    agrees: dict[type, bool] = {}
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child)
            if kind.__name__ not in NORM_CLASSES:
                continue
            weight, eps = child.weight, getattr(child, "variance_epsilon", None)
            if not isinstance(weight, nn.Parameter) or not isinstance(eps, float):
                continue
            if kind not in agrees:
                agrees[kind] = _agrees(child, weight, eps, kernel)
            if agrees[kind]:
                setattr(parent, name, NativeRMSNorm(weight, eps, kernel))
                swapped += 1
    return swapped


@torch.inference_mode()
def _agrees(norm: nn.Module, weight: torch.Tensor, eps: float, kernel: RMSNormKernel) -> bool:
    """The module and the kernel agree on random rows, to the weight dtype's rounding."""
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(7, weight.shape[0], generator=generator, device=weight.device)
    x = (3 * x).to(weight.dtype)
    want = norm(x)
    got = kernel(x, weight, eps)
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance))
