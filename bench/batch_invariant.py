"""The cost of `--batch-invariant`: engine throughput with and without it, side by side.

Drives the engine directly (no HTTP) in the serving comparison's closed loop: at most `c`
requests in flight, corpus prompts with lognormal lengths (median 100 tokens, 8..1000),
max_tokens uniform in 16..256, greedy, EOS ignored. Both engines are loaded once and the runs
alternate (default, invariant, then invariant, default in the next round), so a slow patch of
a shared machine hits both. Reported: output tokens/s per level and mode (median of rounds),
the invariant/default ratio, and where the time went (prefill steps vs decode-only steps).

    .venv/bin/python -m bench.batch_invariant                 # SmolLM2-135M, c=16 and c=64
    .venv/bin/python -m bench.batch_invariant --model DIR --levels 16 --rounds 1
    python -m bench.batch_invariant --device cuda --model DIR --levels 64 --rounds 1

Writes bench/results/batch_invariant.{json,md} (or --name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import serve
from bench.prefill import cpu_model
from bench.profile_engine import run_level
from packserve.engine import Engine, EngineConfig
from packserve.models.smollm2 import default_model_dir
from packserve.scheduler import SamplingParams

MODES = {"default": {}, "invariant": {"batch_invariant": True}}
REQUESTS = {16: 48, 64: 128}  # per level: enough for several turns of the closed loop


def one_run(engine: Engine, prompts: list[serve.Prompt], level: int) -> dict[str, Any]:
    start = time.perf_counter()
    steps = run_level(engine, prompts, level)
    seconds = time.perf_counter() - start
    output = sum(s["output_tokens"] for s in steps)
    assert output == sum(p.max_tokens for p in prompts), "a request came back short"
    assert engine.load().num_kv_blocks_used == 0
    return {
        "seconds": seconds,
        "output_tokens": output,
        "output_tok_s": output / seconds,
        "prefill_step_s": sum(s["seconds"] for s in steps if s["prefill_tokens"]),
        "decode_only_step_s": sum(s["seconds"] for s in steps if not s["prefill_tokens"]),
    }


def markdown(r: dict[str, Any]) -> str:
    gpu = r["machine"].get("gpu")
    where = f"Device: {gpu} (`{r['device']}`), host" if gpu else "Machine:"
    lines = [
        "# Batch-invariant mode: cost in throughput",
        "",
        f"Model {r['model_name']}, {r['dtype']}, engine only (no HTTP), closed loop; "
        f"{r['rounds']} interleaved rounds, median shown. {where} {r['machine']['cpu']}, "
        f"{r['machine']['cores']} cores, torch {r['machine']['torch']}, "
        f"{r['machine']['threads']} threads; load average {r['machine']['loadavg_start']:.2f} "
        f"before, {r['machine']['loadavg_end']:.2f} after.",
        "",
        "| c | requests | default tok/s | invariant tok/s | invariant / default "
        "| prefill-step s (def / inv) | decode-only s (def / inv) |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for level, row in r["levels"].items():
        d, i = row["default"], row["invariant"]
        lines.append(
            f"| {level} | {row['requests']} | {d['output_tok_s']:.1f} | {i['output_tok_s']:.1f} "
            f"| **{row['ratio']:.3f}** | {d['prefill_step_s']:.1f} / {i['prefill_step_s']:.1f} "
            f"| {d['decode_only_step_s']:.1f} / {i['decode_only_step_s']:.1f} |"
        )
    lines += [
        "",
        "Every run of every round: "
        + "; ".join(
            f"c={level} {mode} " + ", ".join(f"{x['output_tok_s']:.1f}" for x in row["runs"][mode])
            for level, row in r["levels"].items()
            for mode in MODES
        ),
        "",
        f"Command: `{r['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    ap.add_argument("--levels", default="16,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="batch_invariant")
    args = ap.parse_args()

    model = args.model or str(default_model_dir())
    tokenizer = serve.load_tokenizer(model)
    engines = {
        mode: Engine(
            EngineConfig(
                model=model,
                dtype=args.dtype,
                device=args.device,
                threads=torch.get_num_threads(),  # both modes alike
                **overrides,
            )
        )
        for mode, overrides in MODES.items()
    }
    for engine in engines.values():
        engine.generate(["warm up", "a second warm-up prompt"], SamplingParams(max_tokens=8))
    load_start = os.getloadavg()[0]
    levels: dict[int, dict[str, Any]] = {}
    for level in (int(x) for x in args.levels.split(",")):
        n = REQUESTS.get(level, 2 * level)
        prompts = serve.synthetic_prompts(tokenizer, n, args.seed + level)
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                runs[mode].append(one_run(engines[mode], prompts, level))
                print(f"c={level} round {r} {mode}: {runs[mode][-1]}", flush=True)
        medians = {
            mode: {k: statistics.median(x[k] for x in runs[mode]) for k in runs[mode][0]}
            for mode in MODES
        }
        levels[level] = {
            "requests": n,
            **medians,
            "ratio": medians["invariant"]["output_tok_s"] / medians["default"]["output_tok_s"],
            "runs": runs,
        }
    gpu = torch.device(args.device).type == "cuda"
    result = {
        "model": model,
        "model_name": Path(model).name,
        "dtype": args.dtype,
        "device": args.device,
        "rounds": args.rounds,
        "levels": levels,
        "machine": {
            "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name(args.device) if gpu else None,
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "command": " ".join(["python -m bench.batch_invariant", *sys.argv[1:]]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
