"""Weight-only int8 and int4 linear layers on torch's own CPU kernels.

A decode step of a small model reads every weight once for a few tokens: its time is the
bytes of the weights more than their FLOPs. Storing them in 8 or 4 bits reads 2x or 4x fewer
bytes than bfloat16; the activations stay in the model's dtype and the kernels dequantize
as they go:

- int8: per output channel, symmetric. `w[n, k] ~ q[n, k] * scale[n]`, q in -128..127;
  `torch.ops.aten._weight_int8pack_mm(x, q, scale)`.
- int4: per group of `group_size` inputs of each output channel, asymmetric. The kernel
  computes `w[n, k] ~ (q[n, k] - 8) * scale[g, n] + zero[g, n]` (g = k // group_size, q in
  0..15) from the weight packed by `_convert_weight_to_int4pack_for_cpu`;
  `torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)`.

Scales (and zeros) are stored in the activations' dtype; the integers are rounded against
the stored values, so what the kernel dequantizes is the nearest grid point to each weight.
`quantize_linears` swaps a decoder's `nn.Linear` modules for these in place; the LM head and
the embedding are not touched (the LM head only sees the sampled rows, and with tied
embeddings its weight is the embedding's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .choices import INT4_GROUP_SIZES, Quantization

INT4_OUT_MULTIPLE = 16  # the int4 packer's constraint on out_features


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] int8, scale [out] in `dtype`): per output channel, symmetric."""
    w = weight.detach().float()  # [out, in]
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).tiny).to(dtype)  # [out]
    q = torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    weight: torch.Tensor, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] int32 in 0..15, scale_and_zero [in / group_size, out, 2] in `dtype`):
    per group of `group_size` inputs, asymmetric, in the kernel's (q - 8) * scale + zero form."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, -1, group_size)  # [out, groups, group]
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
    scale = ((high - low) / 15).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    zero = (low + 8 * scale.float()).to(dtype)  # the value of q = 8
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None]) + 8
    q = q.clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    scale_and_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q, scale_and_zero  # scale_and_zero: [groups, out, 2]


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights (per output channel); activations in the model's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q, scale = quantize_int8(linear.weight, linear.weight.dtype)
        self.register_buffer("weight_int8", q)  # [out, in]
        self.register_buffer("scale", scale)  # [out]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]: the kernel takes 2-D inputs only
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)  # [M, out]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """`nn.Linear` with int4 weights (groups of `group_size` inputs)."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group_size = group_size
        q, scale_and_zero = quantize_int4(linear.weight, group_size, linear.weight.dtype)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [out, in / 2] uint8
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)  # [in / group, out, 2]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.weight_int4, self.group_size, self.scale_and_zero
        )  # [M, out]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def int4_unfit_reason(linear: nn.Linear, group_size: int) -> str | None:
    """Why the int4 kernel cannot hold this layer; None if it can."""
    if linear.in_features % group_size:
        return f"in_features {linear.in_features} is not a multiple of the group size {group_size}"
    if linear.out_features % INT4_OUT_MULTIPLE:
        return f"out_features {linear.out_features} is not a multiple of {INT4_OUT_MULTIPLE}"
    return None


@dataclass(frozen=True, slots=True)
class QuantizationReport:
    """What `quantize_linears` did to a model."""

    mode: Quantization
    num_quantized: int  # linear layers now holding int8 / int4 weights
    kept: tuple[tuple[str, str], ...]  # (module name, why) of layers left in the model's dtype


def quantize_linears(decoder: nn.Module, mode: Quantization, group_size: int) -> QuantizationReport:
    """Swap every `nn.Linear` under `decoder` for its int8 or int4 form, in place. A layer the
    int4 kernel cannot hold (shape constraints) stays as it is and is named in the report, so
    a model with such layers still serves, with those layers unquantized."""
    if mode != "none" and next(decoder.parameters()).device.type != "cpu":
        raise ValueError(f"--quantization {mode} runs on torch's CPU kernels: CPU only")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"the int4 group size must be one of {INT4_GROUP_SIZES}")
    swaps, kept = [], []
    for parent_name, parent in decoder.named_modules():
        for name, child in parent.named_children():
            if mode == "none" or type(child) is not nn.Linear:
                continue
            reason = int4_unfit_reason(child, group_size) if mode == "int4" else None
            if reason is not None:
                kept.append((f"{parent_name}.{name}".lstrip("."), reason))
            else:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        new = Int8Linear(child) if mode == "int8" else Int4Linear(child, group_size)
        setattr(parent, name, new)
    return QuantizationReport(mode, len(swaps), tuple(kept))
