"""Greedy sampling's argmax: torch.argmax(dim=-1) vs the C++ kernel (kernels/native.py's
`row_argmax`), alone and inside the engine's decode step.

1. The argmax alone over float32 logits rows of SmolLM2's vocabulary (49,152), at decode batch
   sizes, on 1 and 2 threads; the two alternate, median of the repetitions.
2. One engine per model holding `batch` greedy requests mid-decode: its steps alternate between
   the runner's argmax set to torch's (None) and to the kernel, median step time of each. Same
   engine, same requests, same contexts (they grow by a token a step), so the difference is the
   sampler's.

    .venv/bin/python -m bench.argmax [--models tiny,smollm2] [--batch 64] [--steps 20]

Writes bench/results/argmax.json and argmax.md.
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
from packserve.engine import Engine, EngineConfig
from packserve.kernels.native import build
from packserve.models.model_maker import default_model_dir
from packserve.models.smollm2 import default_model_dir as smollm2_model_dir
from packserve.scheduler import SamplingParams

RESULTS = Path(__file__).parent / "results"
VOCAB = 49152
BATCHES = (1, 16, 64)
REPS = 30


def alone(kernel: Callable[[torch.Tensor], torch.Tensor]) -> list[dict[str, Any]]:
    """Milliseconds per call of each argmax, per thread count and batch."""
    rows = []
    threads = torch.get_num_threads()
    for count in (1, 2):
        torch.set_num_threads(count)
        for batch in BATCHES:
            x = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch))
            assert torch.equal(kernel(x), x.argmax(dim=-1))
            runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
                "torch": lambda rows: rows.argmax(dim=-1),
                "kernel": kernel,
            }
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(REPS):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - start)
            torch_ms = statistics.median(times["torch"]) * 1e3
            kernel_ms = statistics.median(times["kernel"]) * 1e3
            rows.append(
                {"threads": count, "batch": batch, "torch_ms": torch_ms, "kernel_ms": kernel_ms}
            )
            print(rows[-1], flush=True)
    torch.set_num_threads(threads)
    return rows


def in_engine(model_dir: Path, batch: int, steps: int) -> dict[str, Any]:
    """Median decode-step milliseconds with torch's argmax and with the kernel, alternating."""
    engine = Engine(
        EngineConfig(model=str(model_dir), dtype="float32", threads=torch.get_num_threads())
    )
    kernel = engine.runner.argmax
    assert kernel is not None, "the C++ kernels did not build"
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=4 * steps + 8, ignore_eos=True)
    vocab = engine.model.config.vocab_size
    for _ in range(batch):
        engine.add_request(torch.randint(0, vocab, (100,), generator=g).tolist(), params)
    while (
        engine.load().num_waiting
        or engine.last_stats is None
        or engine.last_stats.num_prefill_tokens
    ):
        engine.step()
    times: dict[str, list[float]] = {"torch": [], "kernel": []}
    for _ in range(steps):
        for name, choice in (("torch", None), ("kernel", kernel)):
            engine.runner.argmax = choice
            start = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - start)
    for request_id in list(engine.scheduler.requests):
        engine.abort(request_id)
    engine.step()
    return {
        "batch": batch,
        "steps": steps,
        "torch_step_ms": statistics.median(times["torch"]) * 1e3,
        "kernel_step_ms": statistics.median(times["kernel"]) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    kernels = build().kernels
    assert kernels is not None, "the C++ kernels did not build"
    dirs = {"tiny": default_model_dir(), "smollm2": smollm2_model_dir()}
    with torch.inference_mode():
        calls = alone(kernels.row_argmax)
        steps = []
        for model in args.models.split(","):
            steps.append({"model": model, **in_engine(Path(dirs[model]), args.batch, args.steps)})
            print(steps[-1], flush=True)
    machine = {
        **machine_info(),
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(exist_ok=True)
    summary = {"machine": machine, "alone": calls, "engine": steps}
    (RESULTS / "argmax.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Greedy argmax: torch.argmax vs the C++ kernel",
        "",
        f"CPU: {machine['cpu_model']} ({machine['cpu_cores']} cores), torch "
        f"{machine['torch_version']}, {machine['date']}, load average "
        f"{machine['load_average'][0]:.2f}. `python -m bench.argmax`.",
        "",
        f"## The argmax alone: float32 rows of {VOCAB} logits, median of {REPS} calls",
        "",
        "| threads | rows | torch.argmax ms | kernel ms | kernel / torch |",
        "|--:|--:|--:|--:|--:|",
    ]
    for r in calls:
        lines.append(
            f"| {r['threads']} | {r['batch']} | {r['torch_ms']:.3f} | {r['kernel_ms']:.3f} "
            f"| **{r['kernel_ms'] / r['torch_ms']:.2f}** |"
        )
    lines += [
        "",
        "## A decode step (float32, greedy, prompts of 100 random tokens), steps alternating",
        "",
        "The tiny model's vocabulary is 8,192 tokens, SmolLM2's 49,152.",
        "",
        "| model | batch | steps each | torch argmax: step ms | kernel: step ms | kernel / torch |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in steps:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['steps']} | {r['torch_step_ms']:.1f} "
            f"| {r['kernel_step_ms']:.1f} | **{r['kernel_step_ms'] / r['torch_step_ms']:.3f}** |"
        )
    (RESULTS / "argmax.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
