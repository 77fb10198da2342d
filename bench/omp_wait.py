"""How the engine process's OpenMP threads wait between parallel regions: sleep at once
(OMP_WAIT_POLICY=PASSIVE) or spin a bounded number of times first (GOMP_SPINCOUNT, libgomp,
which torch's CPU wheels use), served through HTTP as bench/serve.py sends it.

Per model (the tiny one, then SmolLM2-135M-Instruct, default flags), one packserve server
(this tree) per wait setting runs side by side (an idle one sleeps once its spin ends). Each
workload (2 x c streamed completions, corpus prompts, ignore_eos, output lengths uniform in
16..128, as bench/lora.py) runs at c=16 and c=64 against every server, the settings in turn
and then in reverse, so load from other processes falls on all alike. Output tok/s over
both repeats, and TTFT p50/p99, against the `passive` server.

    PYTHONPATH=$PWD .venv/bin/python -m bench.omp_wait [--models tiny,smollm2] [--spins N,...]

Writes bench/results/omp_wait.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench import serve
from packserve.models.model_maker import default_model_dir
from packserve.models.smollm2 import default_model_dir as smollm2_model_dir
from packserve.server.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCIES = (16, 64)


def settings(spins: list[int]) -> dict[str, dict[str, str]]:
    out = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
    for n in spins:
        out[f"spin {n}"] = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": str(n)}
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def bench_model(name: str, model_dir: Path, spins: list[int]) -> dict[str, Any]:
    tokenizer = serve.load_tokenizer(str(model_dir))
    servers = {
        label: ServerProcess(
            ["--model", str(model_dir), "--served-model-name", "m"],
            env={"PYTHONPATH": str(ROOT), **env},
            cwd=ROOT,
            ready_timeout=300,
        )
        for label, env in settings(spins).items()
    }
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            serve.warmup(serve.Target(server.url, "m"), 2)
        measured = serve.interleaved(
            name,
            {label: server.url for label, server in servers.items()},
            lambda label, url, n: [serve.Target(url, "m")] * n,
            tokenizer,
            CONCURRENCIES,
        )
    finally:
        for server in servers.values():
            server.stop()
    runs = {
        c: {label: [summary for summary, _ in repeats] for label, repeats in labels.items()}
        for c, labels in measured.items()
    }
    return {"model": name, "runs": runs, "table": table(measured)}


def table(
    measured: dict[str, dict[str, list[tuple[dict[str, Any], list[serve.Record]]]]],
) -> dict[str, dict[str, Any]]:
    """Per concurrency and setting: output tok/s over both repeats, TTFT p50/p99 over all
    requests, failures; tok/s relative to `passive`."""
    out: dict[str, dict[str, Any]] = {}
    for c, labels in measured.items():
        rows = {}
        for label, repeats in labels.items():
            summaries = [summary for summary, _ in repeats]
            tokps = sum(s["output_tokens"] for s in summaries) / sum(
                s["duration_s"] for s in summaries
            )
            ttfts = [r.ttft for _, records in repeats for r in records if r.ttft is not None]
            rows[label] = {
                "tokps": round(tokps, 1),
                "per_repeat": [round(s["output_throughput"], 1) for s in summaries],
                "ttft_p50_s": round(statistics.median(ttfts), 3),
                "ttft_p99_s": round(percentile(ttfts, 0.99), 3),
                "failed": sum(s["failed"] for s in summaries),
            }
        for row in rows.values():
            row["vs_passive"] = round(row["tokps"] / rows["passive"]["tokps"], 3)
        out[c] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--spins", default="30000,100000", help="GOMP_SPINCOUNT values")
    args = parser.parse_args()
    spins = [int(x) for x in args.spins.split(",")]
    dirs = {"tiny": lambda: default_model_dir("tiny"), "smollm2": smollm2_model_dir}
    uptime_start = serve.uptime()
    results = [bench_model(m, dirs[m](), spins) for m in args.models.split(",")]
    result = {**serve.machine(uptime_start), "spins": spins, "models": results}
    serve.save_results("omp_wait", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# How the engine's OpenMP threads wait: sleep at once vs spin first",
        "",
        f"CPU: {r['cpu']} ({r['num_cpus']} cores; `uptime` before: {r['uptime_start']}; after: "
        f"{r['uptime_end']}). One server per setting, default flags; 2 x c streamed "
        "completions per run (output 16..128 tokens, ignore_eos), settings in turn then "
        "reversed; tok/s over both repeats, TTFT over all requests. `spin N`: "
        "OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=N; `passive`: OMP_WAIT_POLICY=PASSIVE.",
        "",
        "| model | c | setting | out tok/s (per repeat) | vs passive | TTFT p50 s | TTFT p99 s "
        "| failed |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for m in r["models"]:
        for c, rows in m["table"].items():
            for label, x in rows.items():
                reps = ", ".join(str(v) for v in x["per_repeat"])
                lines.append(
                    f"| {m['model']} | {c} | {label} | {x['tokps']} ({reps}) "
                    f"| **{x['vs_passive']}** | {x['ttft_p50_s']} | {x['ttft_p99_s']} "
                    f"| {x['failed']} |"
                )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
