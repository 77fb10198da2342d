"""Where serving time goes: packserve's engine under the comparison's closed-loop load.

Drives the engine directly (no HTTP) with the same prompts bench/compare_servers.py uses at
each concurrency level, records every step (prefill or decode-only, batch size, seconds), and
puts the decode steps next to this machine's floors: the time to read the weights once
(memory bandwidth, measured here) and the time of the step's GEMMs at the measured matmul
peak. Then torch.profiler shows the operators of decode steps at each level's full batch.

    .venv/bin/python -m bench.profile_engine [--size bench] [--levels 16,64]

Writes bench/results/profile_engine.json and profile_engine.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import profile

from bench import serve
from bench.compare_servers import DEFAULT_PROMPTS
from bench.gemm import best_rate
from packserve.engine import Engine, EngineConfig
from packserve.kernels.linear import pack_weight, packed_linear
from packserve.models.model_maker import default_model_dir
from packserve.scheduler import SamplingParams


def machine_floors() -> dict[str, float]:
    """Matmul peak (fp32 GFLOP/s: the better of torch.mm and oneDNN with a prepacked operand,
    which the model's linear layers use) and memory bandwidth (GB/s, read + write of a 256 MiB
    copy)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    packed = pack_weight(b.t())
    src, dst = torch.empty(1 << 26), torch.empty(1 << 26)
    flops = 2 * 2048**3
    return {
        "matmul_gflops": best_rate(lambda: torch.mm(a, b), flops),
        "onednn_gflops": best_rate(lambda: packed_linear(a, packed), flops),
        "copy_gbps": best_rate(lambda: dst.copy_(src), 2 * src.numel() * 4),
    }


def run_level(engine: Engine, prompts: list[serve.Prompt], level: int) -> list[dict[str, Any]]:
    """The compare_servers engine-only loop: at most `level` requests in flight."""
    todo = list(range(len(prompts)))[::-1]
    in_flight: set[str] = set()
    steps = []
    while todo or engine.has_unfinished:
        while todo and len(in_flight) < level:
            p = prompts[todo.pop()]
            params = SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True)
            in_flight.add(engine.add_request(p.text, params))
        tokens = 0
        for delta in engine.step():
            tokens += len(delta.token_ids)
            if delta.finish_reason:
                in_flight.discard(delta.request_id)
        s = engine.last_stats
        assert s is not None
        steps.append(
            {
                "prefill_tokens": s.num_prefill_tokens,
                "decode_tokens": s.num_decode_tokens,
                "output_tokens": tokens,
                "seconds": s.step_time_s,
            }
        )
    return steps


def summarize(
    steps: list[dict[str, Any]], weight_bytes: int, floors: dict[str, float], params: int
) -> dict[str, Any]:
    """Prefill vs decode-only steps; decode step time by batch size next to the floors."""
    prefill = [s for s in steps if s["prefill_tokens"]]
    decode = [s for s in steps if not s["prefill_tokens"]]
    by_batch: dict[int, list[float]] = defaultdict(list)
    for s in decode:
        by_batch[-(-s["decode_tokens"] // 8) * 8].append(s["seconds"])
    read_ms = weight_bytes / (floors["copy_gbps"] / 2 * 1e9) * 1e3  # one read of every weight
    peak = max(floors["matmul_gflops"], floors["onednn_gflops"])
    rows = []
    for batch, times in sorted(by_batch.items()):
        gemm_ms = 2 * batch * params / (peak * 1e9) * 1e3
        rows.append(
            {
                "batch_up_to": batch,
                "steps": len(times),
                "median_ms": statistics.median(times) * 1e3,
                "weight_read_floor_ms": read_ms,
                "gemm_floor_ms": gemm_ms,
            }
        )
    total = sum(s["seconds"] for s in steps)
    return {
        "steps": len(steps),
        "seconds": total,
        "output_tokens": sum(s["output_tokens"] for s in steps),
        "prefill_steps": len(prefill),
        "prefill_seconds": sum(s["seconds"] for s in prefill),
        "prefill_tokens": sum(s["prefill_tokens"] for s in prefill),
        "decode_steps": len(decode),
        "decode_seconds": sum(s["seconds"] for s in decode),
        "decode_by_batch": rows,
    }


def decode_profile(engine: Engine, prompts: list[serve.Prompt], batch: int) -> str:
    """torch.profiler over 5 decode steps of `batch` sequences."""
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for p in prompts[:batch]:
        engine.add_request(p.text, params)

    def prefilling() -> bool:
        stats = engine.last_stats
        return engine.load().num_waiting > 0 or stats is None or stats.num_prefill_tokens > 0

    while prefilling():
        engine.step()
    with profile() as prof:
        for _ in range(5):
            engine.step()
    for request_id in list(engine.scheduler.requests):
        engine.abort(request_id)
    engine.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def markdown(result: dict[str, Any]) -> str:
    m, f = result["machine"], result["floors"]
    lines = [
        f"# Engine profile under closed-loop load ({m['date']})",
        "",
        f"{m['cores']} cores, torch {m['torch']}; model `{result['size']}` "
        f"({result['params'] / 1e6:.0f}M params, {result['weight_bytes'] / 2**20:.0f} MiB of "
        f"weights); load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end. Matmul peak torch.mm {f['matmul_gflops']:.0f}, "
        f"oneDNN {f['onednn_gflops']:.0f} GFLOP/s (the floor uses the higher), "
        f"memory copy {f['copy_gbps']:.1f} GB/s (read + write).",
        "",
        "| concurrency | out tok/s | prefill steps: s (tokens) | decode steps: s (count) |",
        "|--:|--:|--:|--:|",
    ]
    for level, r in result["levels"].items():
        lines.append(
            f"| {level} | {r['output_tokens'] / r['seconds']:.0f} | "
            f"{r['prefill_seconds']:.1f} ({r['prefill_tokens']}) | "
            f"{r['decode_seconds']:.1f} ({r['decode_steps']}) |"
        )
    lines += [
        "",
        "Decode-only steps by batch size (median ms), against the floors: reading every weight "
        "once at the measured bandwidth, and the step's GEMM FLOPs at the matmul peak.",
        "",
        "| concurrency | batch <= | steps | median ms | weight-read floor ms | GEMM floor ms |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for level, r in result["levels"].items():
        for row in r["decode_by_batch"]:
            lines.append(
                f"| {level} | {row['batch_up_to']} | {row['steps']} | {row['median_ms']:.1f} | "
                f"{row['weight_read_floor_ms']:.1f} | {row['gemm_floor_ms']:.1f} |"
            )
    for batch, table in result["decode_profiles"].items():
        lines += ["", f"## Operators of 5 decode steps at batch {batch}", ""]
        lines += ["```", table, "```"]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    model_dir = str(default_model_dir(args.size))
    tokenizer = serve.load_tokenizer(model_dir)
    engine = Engine(EngineConfig(model=model_dir))
    engine.generate(["warm up"], SamplingParams(max_tokens=4))
    model = engine.runner.model
    params = (
        sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    load_start = os.getloadavg()
    floors = machine_floors()
    levels = {}
    for level in (int(x) for x in args.levels.split(",")):
        prompts = serve.synthetic_prompts(
            tokenizer, DEFAULT_PROMPTS.get(level, 2 * level), args.seed + level
        )
        levels[level] = summarize(run_level(engine, prompts, level), weight_bytes, floors, params)
        print(json.dumps({level: levels[level]}), flush=True)
    profiles = {
        level: decode_profile(
            engine, serve.synthetic_prompts(tokenizer, level, args.seed + level), level
        )
        for level in levels
    }
    result = {
        "size": args.size,
        "params": params,
        "weight_bytes": weight_bytes,
        "floors": floors,
        "levels": levels,
        "decode_profiles": profiles,
        "machine": {
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_engine.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "profile_engine.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
