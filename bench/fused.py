"""Stacked GEMMs per decoder layer, timed at a model's own shapes (kernels/fused.py and the
LoRA expand of kernels/lora/layers.py): what the choices in those modules rest on.

Per layer of the model, with a different weight for each of its layers (so weights stream
from memory as in a real step, not from cache), at decode-sized row counts:

- base: q, k, v, gate, up as five GEMMs (each the way the runner runs it: oneDNN-packed when
  it holds at least 2^18 weights, torch otherwise) against two stacked GEMMs (q/k/v, gate/up);
- LoRA expand (rank 8, 8 slots, on all seven projections): a block-diagonal B per shared GEMM
  with torch's addmm_, the same B packed for oneDNN (GEMM then add_), and one addmm_ per
  projection.

    PYTHONPATH=$PWD .venv/bin/python -m bench.fused [--models tiny,smollm2]

Writes bench/results/fused.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.packing_window import machine_info
from packserve.kernels.linear import MIN_WEIGHT_ELEMENTS, pack_weight, packed_linear
from packserve.models.model_maker import default_model_dir
from packserve.models.smollm2 import default_model_dir as smollm2_model_dir

RESULTS = Path(__file__).parent / "results"
ROWS = (1, 16, 64)
RANK, SLOTS = 8, 8
DTYPES = ("bfloat16", "float32")
Gemm = Callable[[torch.Tensor], torch.Tensor]


def shapes(model_dir: Path) -> tuple[int, int, int, int]:
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    return hidden, kv, inter, config["num_hidden_layers"]


def gemm(weight: torch.Tensor) -> Gemm:
    """x @ weight^T as the runner computes it for a weight of this size."""
    if weight.numel() >= MIN_WEIGHT_ELEMENTS:
        packed = pack_weight(weight)
        return lambda x: packed_linear(x, packed)
    return lambda x: torch.nn.functional.linear(x, weight)


def per_layer_us(run: Callable[[], None], layers: int, repeats: int = 7) -> float:
    """Median over `repeats` of one pass over every layer, per layer, in microseconds."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / layers * 1e6


def measure(model_dir: Path, dtype: torch.dtype, rows: int) -> dict[str, float]:
    hidden, kv, inter, layers = shapes(model_dir)
    generator = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(dtype)

    groups = [[hidden, kv, kv], [inter, inter]]  # q/k/v and gate/up: out sizes, input hidden
    x = rand(rows, hidden)
    apart: list[list[Gemm]] = []
    stacked: list[Gemm] = []
    for _ in range(layers):
        for outs in groups:
            weights = [rand(out, hidden) for out in outs]
            apart.append([gemm(w) for w in weights])
            stacked.append(gemm(torch.cat(weights)))
    width = RANK * SLOTS
    expand_groups = [[hidden, kv, kv], [hidden], [inter, inter], [hidden]]
    expands = []
    for _ in range(layers):
        for outs in expand_groups:
            b = [rand(width, out) for out in outs]
            block = torch.block_diag(*b)
            y = rand(rows, sum(outs))
            expands.append((y, rand(rows, width * len(outs)), b, block, pack_weight(block.T)))

    def base_apart() -> None:
        for member_gemms in apart:
            for g in member_gemms:
                g(x)

    def base_stacked() -> None:
        for g in stacked:
            g(x)

    def block_addmm() -> None:
        for y, h, _, block, _ in expands:
            y.addmm_(h, block)

    def block_packed() -> None:
        for y, h, _, _, packed in expands:
            y.add_(packed_linear(h, packed))

    def member_addmm() -> None:
        for y, h, b, _, _ in expands:
            start = 0
            for i, bi in enumerate(b):
                y[:, start : start + bi.shape[1]].addmm_(h[:, i * width : (i + 1) * width], bi)
                start += bi.shape[1]

    runs = {
        "base_apart_us": base_apart,
        "base_stacked_us": base_stacked,
        "lora_expand_block_addmm_us": block_addmm,
        "lora_expand_block_packed_us": block_packed,
        "lora_expand_member_addmm_us": member_addmm,
    }
    return {name: per_layer_us(run, layers) for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    args = parser.parse_args()
    dirs = {"tiny": default_model_dir(), "smollm2": smollm2_model_dir()}
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for model in args.models.split(","):
            for dtype in DTYPES:
                for n in ROWS:
                    result = measure(Path(dirs[model]), getattr(torch, dtype), n)
                    rows.append({"model": model, "dtype": dtype, "rows": n, **result})
                    print(rows[-1], flush=True)
    machine = {
        **machine_info(),
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [
        "# Stacked GEMMs per decoder layer (kernels/fused.py, LoRA expand)",
        "",
        f"CPU: {machine['cpu_model']} ({machine['cpu_cores']} cores, "
        f"{machine['torch_threads']} threads), torch {machine['torch_version']}, "
        f"{machine['date']}, load average "
        f"{machine['load_average'][0]:.2f}. Microseconds per decoder layer, a different weight "
        f"per layer; LoRA rank {RANK}, {SLOTS} slots. `python -m bench.fused`.",
        "",
        "| model | dtype | rows | q,k,v,gate,up apart | stacked | stacked / apart "
        "| expand: block addmm_ | block packed | per member addmm_ |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['rows']} | {r['base_apart_us']:.0f} "
            f"| {r['base_stacked_us']:.0f} | **{r['base_stacked_us'] / r['base_apart_us']:.2f}** "
            f"| {r['lora_expand_block_addmm_us']:.0f} | {r['lora_expand_block_packed_us']:.0f} "
            f"| {r['lora_expand_member_addmm_us']:.0f} |"
        )
    (RESULTS / "fused.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
