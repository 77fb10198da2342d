"""What this machine computes natively, and the dtype `--dtype auto` resolves to from it.

bfloat16 halves the bytes every decode step reads and, where the CPU has bf16 instructions
(AMX on Intel Xeon since Sapphire Rapids, AVX512-BF16 on AMD Zen 4 and Intel Cooper Lake),
runs its GEMMs several times faster than float32 (issue 16: 3-10x for prefill-sized GEMMs
with AMX). Without them torch emulates bfloat16 through float32, slower than float32 itself.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

from .choices import Dtype, DtypeChoice

# /proc/cpuinfo flags naming a native bfloat16 dot product.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")


@cache  # the CPU does not change under a process: read the file once per field
def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo; None where there is no such file or field."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None off Linux."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else frozenset(flags.split())


def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name"), or the platform's processor string."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def has_native_bf16(device: str) -> bool:
    """The device computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AMX-BF16 or AVX512-BF16 (its /proc/cpuinfo flags; torch's own probes off Linux)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & NATIVE_BF16_FLAGS)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, may go
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_dtype(choice: DtypeChoice, device: str) -> Dtype:
    """The dtype a `--dtype` value means on `device`: "auto" is bfloat16 where it is native,
    float32 elsewhere; any other value is itself."""
    if choice != "auto":
        return choice
    return "bfloat16" if has_native_bf16(device) else "float32"
