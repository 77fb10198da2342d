"""Weight-only int8 and int4 linear layers on CPU kernels.

A decode step of a small model reads every weight once for a few tokens: its time is the
bytes of the weights more than their FLOPs. Storing them in 8 or 4 bits reads 2x or 4x fewer
bytes than bfloat16; the activations stay in the model's dtype and the kernels dequantize
as they go:

- int8: per output channel, symmetric. `w[n, k] ~ q[n, k] * scale[n]`, q in -128..127;
  out = (x @ q^T) * scale, summed in float32: by packserve's C++ kernel
  (kernels/csrc/int8_linear.cpp; float32 and bfloat16 activations), or from
  `DEQUANTIZE_FROM_ROWS` rows, where the dtype's GEMM is native, by that GEMM on q converted
  to the dtype (exact: |q| <= 128) and then the scale; where the C++ kernels do not build, by
  `torch.ops.aten._weight_int8pack_mm(x, q, scale)`.
- int4: per group of `group_size` inputs of each output channel, asymmetric. The kernel
  computes `w[n, k] ~ (q[n, k] - 8) * scale[g, n] + zero[g, n]` (g = k // group_size, q in
  0..15) from the weight packed by `_convert_weight_to_int4pack_for_cpu`;
  `torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)`.

Scales (and zeros) are stored in the activations' dtype; the integers are rounded against
the stored values, so what the kernel dequantizes is the nearest grid point to each weight.
`quantize_linears` swaps a model's decoder `nn.Linear` modules for these in place, and its LM
head for an int8 copy in either mode (llama.cpp's quantized models keep the output layer in
more bits than the body too). A decode step multiplies every sampled row by the head, the
largest layer of a small model with a large vocabulary (SmolLM2-135M: 28 of its 135 M
weights); in bfloat16 on a CPU without bf16 dot products torch emulates it, 4x slower than
the int8 kernel at 16 rows. The embedding keeps the model's dtype (a tied head's int8 copy
is a second tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from .choices import INT4_GROUP_SIZES, Quantization
from .machine import has_native_bf16
from .native import Int8LinearKernel
from .native import build as build_native

INT4_OUT_MULTIPLE = 16  # the int4 packer's constraint on out_features
INT8_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # activations the C++ kernel takes
# Rows (tokens) of a forward from which Int8Linear dequantizes and runs the dtype's own GEMM
# instead of the C++ kernel: the GEMM's larger register tiles win once the rows amortize
# converting the weight. Float32, SmolLM2's six layer shapes, AMD EPYC (Zen 3, AVX2), time
# per call of the kernel over q -> float32 + F.linear + scale (median, range): 1 thread,
# 32 rows 0.86 (0.70-1.02), 48 rows 1.04, 64 rows 1.22 (0.97-1.30), 96 rows 1.26; 2 threads,
# 48 rows 0.76, 64 rows 0.83 (0.74-1.04), 96 rows 1.01, 128 rows 1.14; 256 rows 1.4-1.6.
# Bfloat16 where the CPU has bf16 dot products should cross over near here too
# (bench/results/quant.md, Zen 4, 1536x576 at 64 rows: dequantized + oneDNN bf16 690 us,
# _weight_int8pack_mm 1490 us, which the kernel beats by 1.4x here); without them torch
# emulates bfloat16 GEMMs through float32, 2-5x slower than the kernel at every row count
# measured (1-256), so there the kernel runs every forward.
DEQUANTIZE_FROM_ROWS = 64


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


def int8_kernel() -> Int8LinearKernel | None:
    """packserve's C++ int8 linear, or None where the C++ kernels do not build."""
    kernels = build_native().kernels
    return None if kernels is None else kernels.int8_linear


def dequantize_from_rows(dtype: torch.dtype) -> int | None:
    """Rows from which a forward in `dtype` runs the dequantized GEMM instead of the C++
    kernel; None: never (`DEQUANTIZE_FROM_ROWS`)."""
    if dtype == torch.bfloat16 and not has_native_bf16("cpu"):
        return None
    return DEQUANTIZE_FROM_ROWS


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights (per output channel); activations in the model's dtype.
    `kernel`: the C++ int8 linear (`int8_kernel()`), or None for torch's own op."""

    weight_int8: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear, kernel: Int8LinearKernel | None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q, scale = quantize_int8(linear.weight, linear.weight.dtype)
        self.register_buffer("weight_int8", q)  # [out, in]
        self.register_buffer("scale", scale)  # [out]
        self.bias = linear.bias
        native = linear.weight.device.type == "cpu" and linear.weight.dtype in INT8_KERNEL_DTYPES
        self.kernel = kernel if native else None
        self.dequantize_from = dequantize_from_rows(linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]: the kernels take 2-D inputs only
        if self.kernel is None:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        elif self.dequantize_from is not None and len(rows) >= self.dequantize_from:
            out = F.linear(rows, self.weight_int8.to(rows.dtype)).mul_(self.scale)  # [M, out]
        else:
            out = self.kernel(rows.contiguous(), self.weight_int8, self.scale)  # [M, out]
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
    num_quantized: int  # decoder linear layers now holding int8 / int4 weights
    kept: tuple[tuple[str, str], ...]  # (module name, why) of layers left in the model's dtype
    int8_head: bool  # the LM head holds int8 weights


def quantize_linears(
    model: PreTrainedModel, mode: Quantization, group_size: int
) -> QuantizationReport:
    """Swap every `nn.Linear` of the model's decoder for its int8 or int4 form, and its LM
    head for its int8 form, in place. A layer the int4 kernel cannot hold (shape constraints)
    stays as it is and is named in the report, so a model with such layers still serves, with
    those layers unquantized."""
    if mode == "none":
        return QuantizationReport(mode, 0, (), False)
    if model.device.type != "cpu":
        raise ValueError(f"--quantization {mode} runs on CPU kernels: CPU only")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"the int4 group size must be one of {INT4_GROUP_SIZES}")
    swaps, kept = [], []
    kernel = int8_kernel()
    for parent_name, parent in model.get_decoder().named_modules():
        for name, child in parent.named_children():
            if type(child) is not nn.Linear:
                continue
            reason = int4_unfit_reason(child, group_size) if mode == "int4" else None
            if reason is not None:
                kept.append((f"{parent_name}.{name}".lstrip("."), reason))
            else:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        new = Int8Linear(child, kernel) if mode == "int8" else Int4Linear(child, group_size)
        setattr(parent, name, new)
    head = model.get_output_embeddings()
    int8_head = type(head) is nn.Linear
    if int8_head:
        model.set_output_embeddings(Int8Linear(head, kernel))
    return QuantizationReport(mode, len(swaps), tuple(kept), int8_head)
