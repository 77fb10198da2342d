"""Mixed steps: decode tokens packed into the prefill rows (one forward per step) vs. decode
tokens run as a forward of their own (two per step), same schedule otherwise; and where a
c=64 step's time goes.

The engine is driven directly (no HTTP), closed loop at concurrency 64, with issue 14's
workload (corpus prompts, lognormal lengths median 50 clipped to 650, max_tokens 16..128,
greedy). The two variants run alternately, `--rounds` times each, on one engine whose
scheduler config is switched between runs (`mix_decodes`), so drift hits both alike. Then
torch.profiler records steady-state mixed steps and splits their time by operator family.

    .venv/bin/python -m bench.mixed_steps [--rounds 2] [--prompts 96]

Writes bench/results/mixed_steps.json and mixed_steps.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import profile

from bench import serve
from bench.compare_servers import git_state
from bench.prefill import cpu_model
from bench.scheduling import cut
from packserve.engine import Engine, EngineConfig
from packserve.scheduler import SamplingParams

LEVEL = 64
FAMILIES = {  # operator name fragments -> family, first match wins
    "linear": ("linear", "addmm", "mkldnn", "matmul", " mm"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "KV cache read/write": ("index_select", "index_copy", "index"),
    "sampling": ("topk", "softmax", "argmax", "sort", "multinomial"),
}


def run(engine: Engine, prompts: list[serve.Prompt]) -> dict[str, Any]:
    """All prompts through the engine, at most LEVEL in flight; per-step figures."""
    todo = list(reversed(prompts))
    in_flight: set[str] = set()
    steps: list[tuple[float, int, int, float]] = []
    out_tokens = 0
    start = time.perf_counter()
    while todo or engine.has_unfinished:
        while todo and len(in_flight) < LEVEL:
            p = todo.pop()
            params = SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True)
            in_flight.add(engine.add_request(p.text, params))
        for delta in engine.step():
            out_tokens += len(delta.token_ids)
            if delta.finish_reason:
                in_flight.discard(delta.request_id)
        s = engine.last_stats
        if s is not None:
            steps.append((s.step_time_s, s.num_prefill_tokens, s.num_decode_tokens, s.bin_fill))
    wall = time.perf_counter() - start
    mixed = [st for st in steps if st[1] and st[2]]
    return {
        "wall_s": wall,
        "output_tok_s": out_tokens / wall,
        "steps": len(steps),
        "mixed_steps": len(mixed),
        "mean_step_ms": 1000 * statistics.mean(st[0] for st in steps),
        "mean_mixed_step_ms": 1000 * statistics.mean(st[0] for st in mixed) if mixed else None,
        "bin_fill_mixed_steps": statistics.mean(st[3] for st in mixed) if mixed else None,
    }


def family(name: str) -> str:
    lowered = f" {name.lower()}"
    for fam, fragments in FAMILIES.items():
        if any(f in lowered for f in fragments):
            return fam
    return "other operators"


def profile_steps(engine: Engine, prompts: list[serve.Prompt], steps: int) -> dict[str, float]:
    """Seconds per family over `steps` steady-state steps (LEVEL requests running, prompts
    still arriving), plus Python and scheduling (wall time the operators do not cover)."""
    for p in prompts:
        params = SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True)
        engine.add_request(p.text, params)
    for _ in range(20):  # past the first prefills
        engine.step()
    wall = 0.0
    with profile() as prof:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            wall += time.perf_counter() - start
    while engine.has_unfinished:
        engine.step()
    out: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("mkldnn"):
            fam = family(event.key)
            out[fam] = out.get(fam, 0.0) + event.self_cpu_time_total / 1e6
    covered = sum(out.values())
    out["python, scheduler, input building"] = max(wall - covered, 0.0)
    return {k: v / steps for k, v in out.items()}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Mixed steps: decode tokens in the packed rows vs. a forward of their own",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; SmolLM2-135M-Instruct fp32; "
        f"{result['prompts']} prompts at c={LEVEL}; {result['rounds']} rounds, alternating; "
        f"git {result['git']['head'][:8]}.",
        "",
        "| variant | out tok/s (median) | steps | mixed steps | mean step ms | mean mixed "
        "step ms | bin fill, mixed steps |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, runs in result["runs"].items():
        med = statistics.median(r["output_tok_s"] for r in runs)
        r = runs[-1]
        fill = r["bin_fill_mixed_steps"]
        lines.append(
            f"| {name} | {med:.1f} | {r['steps']} | {r['mixed_steps']} | "
            f"{r['mean_step_ms']:.0f} | {r['mean_mixed_step_ms'] or 0:.0f} | "
            f"{fill if fill is None else round(fill, 3)} |"
        )
    lines += [
        "",
        f"mixed / separate output tok/s: **{result['ratio']:.3f}**",
        "",
        f"## Where a c={LEVEL} step's time goes (mixed, {result['profile_steps']} steady steps)",
        "",
        "| part | ms per step | share |",
        "|---|--:|--:|",
    ]
    total = sum(result["profile"].values())
    for part, secs in sorted(result["profile"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {part} | {1000 * secs:.1f} | {100 * secs / total:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/mixed_steps"))
    args = p.parse_args()
    engine = Engine(EngineConfig(model=args.model))
    tok = engine.tokenizer
    prompts = cut(tok, args.prompts, 0, 50, 1.0, 650, 16, 128)
    mixed_config = engine.scheduler.config
    configs = {
        "mixed (one forward)": mixed_config,
        "separate (two forwards)": dataclasses.replace(mixed_config, mix_decodes=False),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    run(engine, prompts[:8])  # warm-up
    for i in range(args.rounds):
        order = list(configs) if i % 2 == 0 else list(reversed(configs))
        for name in order:
            engine.scheduler.config = configs[name]
            runs[name].append(run(engine, prompts))
            print(name, {k: round(v, 3) for k, v in runs[name][-1].items()}, flush=True)
    engine.scheduler.config = mixed_config
    medians = {n: statistics.median(r["output_tok_s"] for r in rs) for n, rs in runs.items()}
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "git": git_state(),
        "prompts": args.prompts,
        "rounds": args.rounds,
        "runs": runs,
        "ratio": medians["mixed (one forward)"] / medians["separate (two forwards)"],
        "profile_steps": args.profile_steps,
        "profile": profile_steps(engine, prompts, args.profile_steps),
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
