"""Where serving time goes: packserve's engine under the comparison's closed-loop load.

Drives the engine directly (no HTTP) with the same prompts bench/compare_servers.py uses at
each concurrency level, records every step (prefill or decode-only, batch size, seconds), and
puts the decode steps next to this machine's floors: the time to read the weights and the K/V
the step attends to once (memory bandwidth, measured here) and the time of the step's GEMMs at
the matmul peak measured in the engine's dtype; a step's floor is the larger of the two, and
its ratio to that floor is what issue 16 bounds (at most 3 at batch 64). Then torch.profiler
shows the operators of decode steps at each level's full batch.

    .venv/bin/python -m bench.profile_engine [--size smollm2] [--levels 16,64] [--dtype auto]

Writes bench/results/<stem>.json and <stem>.md (stem: --stem, default profile_engine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import profile

from bench import serve
from bench.compare_servers import DEFAULT_PROMPTS
from bench.gemm import best_rate
from bench.grammar_engines import cpu_model
from packserve.engine import Engine, EngineConfig
from packserve.kernels.fused import ProjectionSlice
from packserve.kernels.linear import PackedLinear, pack_weight, packed_linear
from packserve.models.model_maker import default_model_dir
from packserve.models.smollm2 import default_model_dir as smollm2_model_dir
from packserve.scheduler import SamplingParams


def machine_floors(dtype: torch.dtype) -> dict[str, float]:
    """Matmul peak in `dtype` (GFLOP/s: the better of torch.mm and oneDNN with a prepacked
    operand, which the model's linear layers use) and memory bandwidth (GB/s, read + write of
    a 256 MiB copy)."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    packed = pack_weight(b.t())
    src, dst = torch.empty(1 << 26), torch.empty(1 << 26)
    flops = 2 * 2048**3
    return {
        "matmul_gflops": best_rate(lambda: torch.mm(a, b), flops),
        "onednn_gflops": best_rate(lambda: packed_linear(a, packed), flops),
        "copy_gbps": best_rate(lambda: dst.copy_(src), 2 * src.numel() * 4),
    }


def gemm_weights(model: torch.nn.Module) -> int:
    """Weights a token's GEMMs read: the decoder's projections (fused groups counted once,
    their LoRA rows left out) and the LM head (tied or not); not the embedding's gather."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, ProjectionSlice):
            weight = module.shared.weight[: module.shared.width]
        elif isinstance(module, torch.nn.Linear | PackedLinear):
            weight = module.weight
        else:
            continue
        if weight.data_ptr() not in seen:
            seen.add(weight.data_ptr())
            total += weight.numel()
    head = model.get_output_embeddings().weight
    return total + (head.numel() if head.data_ptr() not in seen else 0)


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
        # K/V the step's decodes attend to: every running sequence past its prefill
        context = sum(
            r.num_prompt_tokens + r.num_output_tokens
            for r in engine.load().running
            if r.num_output_tokens
        )
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
                "context_tokens": context,
                "seconds": s.step_time_s,
            }
        )
    return steps


def summarize(
    steps: list[dict[str, Any]],
    weight_bytes: int,
    kv_bytes_per_token: int,
    floors: dict[str, float],
    params: int,
) -> dict[str, Any]:
    """Prefill vs decode-only steps; decode step time by batch size next to the floors."""
    prefill = [s for s in steps if s["prefill_tokens"]]
    decode = [s for s in steps if not s["prefill_tokens"]]
    by_batch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in decode:
        by_batch[-(-s["decode_tokens"] // 8) * 8].append(s)
    read_gbps = floors["copy_gbps"] / 2  # a copy reads and writes each byte
    peak = max(floors["matmul_gflops"], floors["onednn_gflops"])
    rows = []
    for batch, group in sorted(by_batch.items()):
        median_ms = statistics.median(s["seconds"] for s in group) * 1e3
        context = statistics.median(s["context_tokens"] for s in group)
        read_ms = (weight_bytes + context * kv_bytes_per_token) / (read_gbps * 1e9) * 1e3
        gemm_ms = 2 * batch * params / (peak * 1e9) * 1e3
        rows.append(
            {
                "batch_up_to": batch,
                "steps": len(group),
                "median_ms": median_ms,
                "median_context_tokens": context,
                "read_floor_ms": read_ms,
                "gemm_floor_ms": gemm_ms,
                "floor_ratio": median_ms / max(read_ms, gemm_ms),
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


def burst_profile(engine: Engine, prompts: list[serve.Prompt]) -> str:
    """torch.profiler over the 2nd to 4th steps after `prompts` arrive at once: steps that mix
    the first prompts' decodes with the later prompts' prefill chunks."""
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p.text, params)
    engine.step()  # prefill only: nothing decodes yet
    lines = []
    with profile() as prof:
        for _ in range(3):
            engine.step()
            s = engine.last_stats
            assert s is not None
            lines.append(
                f"step: {s.num_prefill_tokens} prefill + {s.num_decode_tokens} decode tokens, "
                f"{s.step_time_s * 1e3:.0f} ms"
            )
    for request_id in list(engine.scheduler.requests):
        engine.abort(request_id)
    engine.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return "\n".join([*lines, table])


def markdown(result: dict[str, Any]) -> str:
    m, f = result["machine"], result["floors"]
    lines = [
        f"# Engine profile under closed-loop load ({m['date']})",
        "",
        f"{m.get('cpu', '')}, {m['cores']} cores, torch {m['torch']}; model "
        f"`{result['size']}` ({result['params'] / 1e6:.0f}M params, "
        f"{result['weight_bytes'] / 2**20:.0f} MiB of weights), engine dtype "
        f"{result['dtype']}, linear backend {result['linear_backend']}, decode attention "
        f"{result['decode_attention']}; load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. Matmul peak "
        f"in {result['dtype']}: torch.mm {f['matmul_gflops']:.0f}, oneDNN "
        f"{f['onednn_gflops']:.0f} GFLOP/s (the floor uses the higher), memory copy "
        f"{f['copy_gbps']:.1f} GB/s (read + write). Command: `{result['command']}`.",
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
        "and the K/V the decodes attend to (median context tokens of those steps) once at the "
        "measured bandwidth, and the step's GEMM FLOPs at the matmul peak; ratio = median / "
        "the larger floor.",
        "",
        "| concurrency | batch <= | steps | median ms | context tokens | read floor ms | "
        "GEMM floor ms | ratio |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for level, r in result["levels"].items():
        for row in r["decode_by_batch"]:
            lines.append(
                f"| {level} | {row['batch_up_to']} | {row['steps']} | {row['median_ms']:.1f} | "
                f"{row['median_context_tokens']:.0f} | {row['read_floor_ms']:.1f} | "
                f"{row['gemm_floor_ms']:.1f} | **{row['floor_ratio']:.2f}** |"
            )
    lines += [
        "",
        f"## Operators of 3 mixed steps: {result['burst_size']} prompts arrive at once",
        "",
        "```",
        result["burst_profile"],
        "```",
    ]
    for batch, table in result["decode_profiles"].items():
        lines += ["", f"## Operators of 5 decode steps at batch {batch}", ""]
        lines += ["```", table, "```"]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="smollm2", choices=["smollm2", "bench", "tiny"])
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--dtype", default="auto", help="the engine's --dtype")
    parser.add_argument("--linear-backend", default="auto", help="the engine's --linear-backend")
    parser.add_argument(
        "--decode-attention", default="auto", help="the engine's --decode-attention"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--stem", default="profile_engine", help="output file names")
    args = parser.parse_args()

    model_dir = str(smollm2_model_dir() if args.size == "smollm2" else default_model_dir(args.size))
    tokenizer = serve.load_tokenizer(model_dir)
    engine = Engine(
        EngineConfig(
            model=model_dir,
            dtype=args.dtype,
            linear_backend=args.linear_backend,
            decode_attention=args.decode_attention,
        )
    )
    engine.generate(["warm up"], SamplingParams(max_tokens=4))
    model = engine.runner.model
    params = gemm_weights(model)
    weight_bytes = params * model.get_output_embeddings().weight.element_size()
    kv = engine.runner.kv_cache.spec
    kv_bytes_per_token = kv.bytes_per_block // kv.block_size
    load_start = os.getloadavg()
    floors = machine_floors(getattr(torch, engine.info.dtype))
    levels = {}
    for level in (int(x) for x in args.levels.split(",")):
        prompts = serve.synthetic_prompts(
            tokenizer, DEFAULT_PROMPTS.get(level, 2 * level), args.seed + level
        )
        steps = run_level(engine, prompts, level)
        levels[level] = summarize(steps, weight_bytes, kv_bytes_per_token, floors, params)
        print(json.dumps({level: levels[level]}), flush=True)
    profiles = {
        level: decode_profile(
            engine, serve.synthetic_prompts(tokenizer, level, args.seed + level), level
        )
        for level in levels
    }
    burst_size = max(levels)  # prompts new to the prefix cache (another seed)
    burst = burst_profile(engine, serve.synthetic_prompts(tokenizer, burst_size, args.seed + 999))
    result = {
        "size": args.size,
        "dtype": engine.info.dtype,
        "linear_backend": engine.info.linear_backend,
        "decode_attention": engine.info.decode_attention,
        "command": "python -m bench.profile_engine " + " ".join(sys.argv[1:]),
        "params": params,
        "weight_bytes": weight_bytes,
        "floors": floors,
        "levels": levels,
        "decode_profiles": profiles,
        "burst_size": burst_size,
        "burst_profile": burst,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
