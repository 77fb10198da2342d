"""The paged decode attention kernel (csrc/paged_decode.cpp): built once per machine, loaded.

torch has no CPU kernel that attends through a block table, so decode attention otherwise
gathers each context's K/V out of the pool first (`KVCache.gather`) and attends over the copy,
in length buckets padded to their longest member. This kernel reads the pool in place: one
call per layer for the whole decode batch, no copy, no padding.

It is compiled for this CPU (`-march=native`) by torch's extension builder on first use, which
needs a C++ compiler and ninja; the build is cached under torch's extensions folder, named by a
digest of the source, the flags, the CPU and torch, so another CPU or torch builds its own.
Where it cannot be built, `--decode-attention auto` goes on without it and says why.
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

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
# -ffast-math lets the compiler vectorize the float32 sums and exp; the order of operations
# within a sequence is still fixed by the code, the same in every batch.
FLAGS = ("-O3", "-march=native", "-ffast-math")

# q [B, H, D], k_pool and v_pool [slots, Hkv, D], tables [B, blocks] int32, lengths [B] int32,
# block size, scale -> [B, H, D]
PagedKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float],
    torch.Tensor,
]


@dataclass(frozen=True, slots=True)
class PagedBuild:
    """The loaded kernel, or why there is none."""

    kernel: PagedKernel | None
    error: str | None


def extension_name() -> str:
    """The build's name: a digest of everything the compiled code depends on."""
    key = "\n".join(
        (
            SOURCE.read_text(),
            " ".join(FLAGS),
            cpu_model(),
            " ".join(sorted(cpu_flags() or ())),
            torch.__version__,
        )
    )
    return f"packserve_paged_decode_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@cache
def build() -> PagedBuild:
    """Compile (first time on this machine, ~20-30 s) or load the kernel."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:
        # torch runs `ninja` from PATH; the one this package installs sits beside the
        # interpreter (a virtualenv's bin/), which a venv that is not activated leaves off it.
        os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))
    log.info("loading the paged decode kernel (compiled on first use on this machine, ~30 s)")
    start = time.perf_counter()
    try:
        module = load(
            name=extension_name(),
            sources=[str(SOURCE)],
            extra_cflags=list(FLAGS),
            verbose=False,
        )
    except Exception as error:  # no compiler or ninja, a failed compile: all mean no kernel
        lines = str(error).strip().splitlines() or [type(error).__name__]
        log.warning("paged decode kernel unavailable: %s", lines[-1])
        return PagedBuild(None, lines[-1])
    log.info("paged decode kernel ready in %.1f s", time.perf_counter() - start)
    return PagedBuild(module.paged_decode, None)
