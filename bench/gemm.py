"""GEMM libraries on this CPU: torch's default (`F.linear`; MKL for float32) vs oneDNN with a
prepacked weight (what `PackedLinear` runs), at the bench model's layer shapes, for the row
counts of decode (1..64) and prefill (256..4096), in float32 and bfloat16.

    .venv/bin/python -m bench.gemm

Writes bench/results/gemm.json and gemm.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from packserve.kernels.linear import pack_weight, packed_linear

SHAPES = {"q/o": (768, 768), "k/v": (768, 256), "gate/up": (768, 2048), "down": (2048, 768)}
ROWS = (1, 8, 16, 32, 64, 256, 1024, 4096)
OUT = Path(__file__).parent / "results"


def best_rate(fn, amount: float, seconds: float = 0.3) -> float:
    """`amount` (FLOPs, bytes) per second of fn's best run, in billions."""
    fn()
    best, deadline, runs = float("inf"), time.perf_counter() + seconds, 0
    while runs < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return amount / best / 1e9


def main() -> None:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for m in ROWS:
            for name, (k, n) in SHAPES.items():
                x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
                packed = pack_weight(w)
                flops = 2 * m * k * n
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "rows": m,
                        "shape": name,
                        "k": k,
                        "n": n,
                        "torch_gflops": best_rate(lambda x=x, w=w: F.linear(x, w), flops),
                        "onednn_gflops": best_rate(
                            lambda x=x, p=packed: packed_linear(x, p), flops
                        ),
                    }
                )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "gemm.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [
        f"# GEMM libraries ({machine['date']})",
        "",
        f"{machine['cores']} cores, torch {machine['torch']}, load average "
        f"{machine['loadavg'][0]:.2f}. GFLOP/s, best run; torch = `F.linear`, oneDNN = "
        "prepacked weight. Columns: rows (M) x the bench model's layer shapes.",
        "",
        "| dtype | M | " + " | ".join(f"{s} torch / oneDNN" for s in SHAPES) + " |",
        "|---|--:|" + "--:|" * len(SHAPES),
    ]
    for dtype in ("float32", "bfloat16"):
        for m in ROWS:
            cells = [
                f"{r['torch_gflops']:.0f} / {r['onednn_gflops']:.0f}"
                for r in rows
                if r["dtype"] == dtype and r["rows"] == m
            ]
            lines.append(f"| {dtype} | {m} | " + " | ".join(cells) + " |")
    (OUT / "gemm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
