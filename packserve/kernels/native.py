"""packserve's C++ kernels (csrc/): built once per machine, loaded.

- `paged_decode` (csrc/paged_decode.cpp): decode attention that reads the paged KV pool in
  place. torch has no CPU kernel that attends through a block table, so decode attention
  otherwise gathers each context's K/V out of the pool first (`KVCache.gather`) and attends
  over the copy, in length buckets padded to their longest member; this kernel takes the
  whole decode batch in one call per layer, no copy, no padding.
- `rms_norm` (csrc/rms_norm.cpp): transformers' Llama-family RMSNorm in one pass per row
  instead of eight operators (kernels/norms.py swaps it in).
- `int8_linear` (csrc/int8_linear.cpp): the weight-only linear of `--quantization int8` for
  decode-sized batches, faster than torch's `_weight_int8pack_mm` (kernels/quant.py).
- `row_argmax` (csrc/row_argmax.cpp): greedy sampling's argmax over each row of the logits,
  torch.argmax's answer in 0.13-0.20 of its time (kernels/sampler.py; bench/argmax.py).

They are compiled for this CPU (`-march=native`) by torch's extension builder on first use,
which needs a C++ compiler and ninja; the build is cached under torch's extensions folder,
named by a digest of the sources, the flags, the CPU and torch, so another CPU or torch builds
its own. Where they cannot be built, the engine goes on without them and says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .machine import cpu_flags, cpu_model

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name("csrc") / name
    for name in (
        "bindings.cpp",
        "paged_decode.cpp",
        "rms_norm.cpp",
        "int8_linear.cpp",
        "row_argmax.cpp",
    )
)
# at::parallel_for runs its threads only in code compiled with OpenMP, torch's CPU threading
# (without it every kernel ran on one thread whatever torch.set_num_threads said); the
# extension then calls the libgomp torch has loaded.
OPENMP = ("-fopenmp",) if torch.backends.openmp.is_available() else ()
# -ffast-math lets the compiler vectorize the float32 sums and exp; the order of operations
# within a sequence (or a row) is still fixed by the code, the same in every batch.
FLAGS = ("-O3", "-march=native", "-ffast-math", *OPENMP)
STALE_LOCK_S = 600.0  # a build takes well under a minute

# q [B, H, D], k_pool and v_pool [slots, Hkv, D], tables [B, blocks] int32, lengths [B] int32,
# block size, scale -> [B, H, D]
PagedKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float],
    torch.Tensor,
]
RMSNormKernel = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # x, weight, eps
# x [M, K] float32 or bfloat16, q [N, K] int8, scale [N] float32 or x's dtype -> [M, N]
Int8LinearKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ArgmaxKernel = Callable[[torch.Tensor], torch.Tensor]  # x [N, V] float32 -> [N] int64


@dataclass(frozen=True, slots=True)
class NativeKernels:
    paged_decode: PagedKernel
    rms_norm: RMSNormKernel
    int8_linear: Int8LinearKernel
    row_argmax: ArgmaxKernel


@dataclass(frozen=True, slots=True)
class NativeBuild:
    """The loaded kernels, or why there are none."""

    name: str  # the extension's (see `extension_name`; "" where it could not be named)
    kernels: NativeKernels | None
    error: str | None


def extension_name() -> str:
    """The build's name: a digest of everything the compiled code depends on."""
    key = "\n".join(
        (
            *(source.read_text() for source in SOURCES),
            " ".join(FLAGS),
            cpu_model(),
            " ".join(sorted(cpu_flags() or ())),
            torch.__version__,
        )
    )
    return f"packserve_native_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def build_directory(name: str) -> Path:
    """Where torch builds `name` (TORCH_EXTENSIONS_DIR or its default root), without a lock
    older than `STALE_LOCK_S`: torch's builder waits for its lock file to go away, forever,
    so one left by a build that was killed would hang every later start."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    path = root / "packserve" / name
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("removed a stale build lock %s (a killed build left it)", lock)
    except FileNotFoundError:
        pass
    return path


@cache
def build() -> NativeBuild:
    """Compile (first time on this machine, ~30-40 s) or load the kernels."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:
        # torch runs `ninja` from PATH; the one this package installs sits beside the
        # interpreter (a virtualenv's bin/), which a venv that is not activated leaves off it.
        os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))
    log.info("loading the C++ kernels (compiled on first use on this machine, ~40 s)")
    start = time.perf_counter()
    name = ""  # a source that cannot be read is a failed build too
    try:
        name = extension_name()
        module = load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=list(FLAGS),
            extra_ldflags=list(OPENMP),
            build_directory=str(build_directory(name)),
            verbose=False,
        )
    except Exception as error:  # no compiler or ninja, a failed compile: all mean no kernels
        lines = str(error).strip().splitlines() or [type(error).__name__]
        log.warning("C++ kernels unavailable: %s", lines[-1])
        return NativeBuild(name, None, lines[-1])
    log.info("C++ kernels ready in %.1f s", time.perf_counter() - start)
    return NativeBuild(
        name,
        NativeKernels(module.paged_decode, module.rms_norm, module.int8_linear, module.row_argmax),
        None,
    )
