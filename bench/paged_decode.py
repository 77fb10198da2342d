"""The paged decode kernel (kernels/csrc/paged_decode.cpp): this checkout's against the one of a
base git revision, side by side in one process.

The base's source is compiled into a second extension with the same flags, so both run on the
same machine at the same moment; calls alternate, median of the repetitions. Shapes are
SmolLM2-135M's (9 query heads, 3 K/V heads, head size 64, blocks of 8 tokens), float32, at
decode batch sizes and context lengths of a closed-loop run (bench/profile_engine.py: at c=64
about 170 tokens per sequence, at c=16 about 285) and a long one; each sequence's blocks lie at
random places in a pool the size of SmolLM2's default one (or twice what they take, where
that is more), as after a while of serving. Both
kernels must agree with each other to float tolerance (the base is the reference).

Then inside the engine: SmolLM2 float32 holding 64 greedy sequences mid-decode (prompts of
100..240 tokens), its decode steps alternating between the two kernels (the step inputs take
the kernel from `kernels.inputs.build_native`, which the bench points at a switch), median
step time and time inside the kernel of each. Same engine, same sequences, contexts one token
longer each step, so the difference is the kernel's, with the weights streaming through the
caches between its calls as they do when serving.

    .venv/bin/python -m bench.paged_decode [--base HEAD] [--threads 2]

Writes bench/results/paged_decode.json and paged_decode.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.packing_window import machine_info
from packserve.engine import Engine, EngineConfig
from packserve.kernels import inputs as step_inputs
from packserve.kernels import native
from packserve.models.smollm2 import default_model_dir as smollm2_model_dir
from packserve.scheduler import SamplingParams

RESULTS = Path(__file__).parent / "results"
HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 8
POOL_BLOCKS = 2912  # SmolLM2's default pool on this project's 2-core machine
SHAPES = ((16, 285), (64, 170), (64, 1000))  # (batch, context tokens per sequence)
REPS = 40
BINDING = """
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
namespace packserve {
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& tables, const at::Tensor& lengths, int64_t block_size,
                        double scale);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &packserve::paged_decode, py::call_guard<py::gil_scoped_release>());
}
"""


def base_kernel(revision: str, work: Path):
    """The base revision's paged_decode.cpp, compiled alone with the checkout's flags."""
    from torch.utils.cpp_extension import load

    source = subprocess.run(
        ["git", "show", f"{revision}:packserve/kernels/csrc/paged_decode.cpp"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    ).stdout
    digest = hashlib.sha256((source + " ".join(native.FLAGS)).encode()).hexdigest()[:12]
    (work / "paged_decode.cpp").write_text(source)
    (work / "binding.cpp").write_text(BINDING)
    build = work / "build"
    build.mkdir()
    module = load(
        name=f"paged_base_{digest}",
        sources=[str(work / "paged_decode.cpp"), str(work / "binding.cpp")],
        extra_cflags=list(native.FLAGS),
        extra_ldflags=list(native.OPENMP),
        build_directory=str(build),
        verbose=False,
    )
    return module.paged_decode


def inputs(batch: int, context: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    blocks = -(-context // BLOCK)
    pool = max(POOL_BLOCKS, 2 * batch * blocks)  # at least half of it free
    k_pool = torch.randn(pool * BLOCK, KV_HEADS, DIM, generator=g)
    v_pool = torch.randn(pool * BLOCK, KV_HEADS, DIM, generator=g)
    used = torch.randperm(pool, generator=g)[: batch * blocks]
    tables = used.view(batch, blocks).to(torch.int32).contiguous()
    lengths = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, HEADS, DIM, generator=g)
    return q, k_pool, v_pool, tables, lengths


class Switch:
    """What the step inputs read of native.build() (`.kernels.paged_decode`), switchable
    between kernels and timed."""

    def __init__(self, kernel: Any) -> None:
        self.current = kernel
        self.seconds = 0.0

    @property
    def kernels(self) -> Switch:
        return self

    def paged_decode(self, *args: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = self.current(*args)
        self.seconds += time.perf_counter() - start
        return out


def in_engine(kernels: dict[str, Any], steps: int, threads: int) -> dict[str, Any]:
    """Median decode-step ms and ms inside the kernel, the kernels alternating step by step."""
    switch = Switch(kernels["checkout"])
    real = step_inputs.build_native
    step_inputs.build_native = lambda: switch  # type: ignore[assignment]
    try:
        engine = Engine(
            EngineConfig(
                model=str(smollm2_model_dir()),
                dtype="float32",
                decode_attention="paged",
                threads=threads,
            )
        )
        rng = random.Random(0)
        params = SamplingParams(temperature=0, max_tokens=2 * steps + 8, ignore_eos=True)
        for _ in range(64):
            prompt = [
                rng.randrange(16, engine.info.vocab_size) for _ in range(rng.randint(100, 240))
            ]
            engine.add_request(prompt, params)
        while (
            engine.load().num_waiting
            or engine.last_stats is None
            or engine.last_stats.num_prefill_tokens
        ):
            engine.step()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in kernels}
        for _ in range(steps):
            for name, kernel in kernels.items():
                switch.current, switch.seconds = kernel, 0.0
                start = time.perf_counter()
                engine.step()
                times[name].append((time.perf_counter() - start, switch.seconds))
        for request_id in list(engine.scheduler.requests):
            engine.abort(request_id)
        engine.step()
    finally:
        step_inputs.build_native = real
    return {
        name: {
            "step_ms": statistics.median(t for t, _ in runs) * 1e3,
            "kernel_ms": statistics.median(k for _, k in runs) * 1e3,
        }
        for name, runs in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the base kernel")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=30, help="engine steps per kernel")
    args = parser.parse_args()
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.base], capture_output=True, text=True, check=True
    ).stdout.strip()
    ours = native.build().kernels
    assert ours is not None, "the C++ kernels did not build"
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        base = base_kernel(args.base, Path(work))
        kernels = {"base": base, "checkout": ours.paged_decode}
        for batch, context in SHAPES:
            q, k_pool, v_pool, tables, lengths = inputs(batch, context, batch + context)
            call = (q, k_pool, v_pool, tables, lengths, BLOCK, DIM**-0.5)
            expected = base(*call)
            torch.testing.assert_close(ours.paged_decode(*call), expected)
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(REPS):
                for name, kernel in kernels.items():
                    start = time.perf_counter()
                    kernel(*call)
                    times[name].append(time.perf_counter() - start)
            base_ms = statistics.median(times["base"]) * 1e3
            ours_ms = statistics.median(times["checkout"]) * 1e3
            kv_bytes = 2 * batch * context * KV_HEADS * DIM * 4
            rows.append(
                {
                    "batch": batch,
                    "context": context,
                    "base_ms": base_ms,
                    "checkout_ms": ours_ms,
                    "speedup": base_ms / ours_ms,
                    "checkout_gbps": kv_bytes / ours_ms / 1e6,
                }
            )
            print(rows[-1], flush=True)
        with torch.inference_mode():
            engine = in_engine(kernels, args.steps, args.threads)
        print(engine, flush=True)
    machine = {
        **machine_info(),
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    summary = {"machine": machine, "base": revision, "rows": rows, "engine": engine}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "paged_decode.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Paged decode kernel: this checkout vs a base revision",
        "",
        f"CPU: {machine['cpu_model']} ({machine['cpu_cores']} cores), {args.threads} threads, "
        f"torch {machine['torch_version']}, {machine['date']}, load average "
        f"{machine['load_average'][0]:.2f}. Base: `{revision}`. SmolLM2's attention shapes "
        f"(9 heads, 3 K/V heads, size 64), float32, blocks of {BLOCK} scattered over a "
        f"pool of {POOL_BLOCKS} blocks or twice what they take; one layer's call, median of "
        f"{REPS} alternating calls. "
        f"`python -m bench.paged_decode --base {args.base} --threads {args.threads}`.",
        "",
        "| batch | context tokens each | base ms | checkout ms | speedup | checkout K/V GB/s |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['base_ms']:.3f} | {r['checkout_ms']:.3f} | "
            f"**{r['speedup']:.2f}** | {r['checkout_gbps']:.1f} |"
        )
    base_step, ours_step = engine["base"]["step_ms"], engine["checkout"]["step_ms"]
    base_kernel_ms, ours_kernel_ms = engine["base"]["kernel_ms"], engine["checkout"]["kernel_ms"]
    lines += [
        "",
        f"In the engine: SmolLM2 float32, 64 sequences mid-decode (prompts of 100..240 tokens), "
        f"{args.steps} steps with each kernel, alternating; median ms.",
        "",
        "| kernel | decode step ms | in the kernel ms |",
        "|---|--:|--:|",
        f"| base | {base_step:.1f} | {base_kernel_ms:.1f} |",
        f"| checkout | {ours_step:.1f} | {ours_kernel_ms:.1f} |",
        f"| base / checkout | **{base_step / ours_step:.3f}** | "
        f"**{base_kernel_ms / ours_kernel_ms:.2f}** |",
    ]
    (RESULTS / "paged_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
