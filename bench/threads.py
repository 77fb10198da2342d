"""The engine's intra-op threads while it serves: all of torch's, one fewer, or the default,
which tries both on its decode steps and keeps the faster (issue 16; packserve/engine/threads.py).

Per model (the tiny one, then SmolLM2-135M-Instruct, float32 where the CPU has no native
bf16): output tok/s at c=64 on compare_servers' workload (lognormal prompt lengths, median
100; 16..256 output tokens; greedy, streamed, EOS off) from one server per setting
(`--threads` all cores, one fewer, unset) and from the engine alone with its defaults (no
HTTP: compare_servers' engine-only run). They take turns, in reverse order every other
round; tok/s are all rounds' output tokens over all rounds' time. Every server's
`packserve:engine_threads` gauge (the last step's count) is read every 0.5 s while it runs;
the default's readings are reported.

    .venv/bin/python -m bench.threads [--models tiny,smollm2] [--rounds 2] [--out threads]

Writes bench/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench import compare_servers, serve
from packserve.models.model_maker import default_model_dir
from packserve.models.smollm2 import default_model_dir as smollm2_model_dir
from packserve.server.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
LEVEL = 64
PROMPTS = {"tiny": 128, "smollm2": 64}  # SmolLM2 serves ~100 tok/s here: one wave of 64
ENGINE = "engine alone"


DEFAULT = "HTTP, default"


class GaugeReader:
    """Reads a server's `packserve:engine_threads` every `period` s until stopped."""

    def __init__(self, url: str, period: float = 0.5) -> None:
        self.url, self.period = url, period
        self.counts: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while not self._stop.wait(self.period):
                text = client.get(self.url + "/metrics").text
                for family in text_string_to_metric_families(text):
                    if family.name == "packserve:engine_threads":
                        for sample in family.samples:
                            self.counts[int(sample.value)] += 1

    def __enter__(self) -> GaugeReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def served(name: str, model_dir: str, cores: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """Output tok/s and TTFT per system: a server per thread count, and the engine alone."""
    tokenizer = serve.load_tokenizer(model_dir)
    prompts = serve.synthetic_prompts(tokenizer, PROMPTS[name], LEVEL, 100, 1.0, 8, 1000, 16, 256)
    flags = ["--model", model_dir, "--served-model-name", "m"]
    servers = {
        f"HTTP, --threads {n}": ServerProcess([*flags, "--threads", str(n)], cwd=ROOT)
        for n in (cores, cores - 1)
    }
    servers[DEFAULT] = ServerProcess(flags, cwd=ROOT)
    systems = [*servers, ENGINE]
    gauge: Counter[int] = Counter()
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    try:
        for server in servers.values():
            server.start()
            serve.warmup(serve.Target(server.url, "m"), 2)
        for r in range(rounds):
            for system in systems if r % 2 == 0 else systems[::-1]:
                if system == ENGINE:
                    result = compare_servers.run_engine(model_dir, prompts, LEVEL, tmp, "worker")
                    summary = result["summary"]
                else:
                    target = serve.Target(servers[system].url, "m")
                    with GaugeReader(servers[system].url) as reader:
                        summary = serve.run_benchmark(
                            target, prompts, tokenizer, max_concurrency=LEVEL, progress=False
                        )["summary"]
                    if system == DEFAULT:
                        gauge += reader.counts
                runs[system].append(summary)
                print(f"{name} {system}: {summary['output_throughput']:.1f} tok/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    table = {}
    for system, summaries in runs.items():
        tokens = sum(s["output_tokens"] for s in summaries)
        table[system] = {
            "tokps": round(tokens / sum(s["duration_s"] for s in summaries), 1),
            "per_round": [round(s["output_throughput"], 1) for s in summaries],
            "ttft_p50_ms": round(sum(s["ttft_ms"]["p50"] for s in summaries) / rounds),
            "failed": sum(s["failed"] for s in summaries),
        }
    samples = sum(gauge.values())
    shares = {str(n): round(k / samples, 3) for n, k in sorted(gauge.items())} if samples else {}
    return {"prompts": len(prompts), "table": table, "default_threads_share": shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="threads", help="results stem under bench/results/")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    if cores < 2:
        raise SystemExit("needs at least 2 threads to compare")
    dirs = {"tiny": lambda: default_model_dir("tiny"), "smollm2": smollm2_model_dir}
    uptime_start = serve.uptime()
    tmp = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    models = []
    for name in args.models.split(","):
        model_dir = str(dirs[name]())
        models.append({"model": name, **served(name, model_dir, cores, args.rounds, tmp)})
    result = {
        **serve.machine(uptime_start),
        "command": f"python -m bench.threads --models {args.models} --rounds {args.rounds}",
        "torch": torch.__version__,
        "threads": cores,
        "loadavg_end": os.getloadavg(),
        "level": LEVEL,
        "rounds": args.rounds,
        "models": models,
    }
    serve.save_results(args.out, result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    cores = r["threads"]
    lines = [
        "# The engine's threads while it serves: all cores, one fewer, or tried on its steps",
        "",
        f"CPU: {r['cpu']} ({cores} threads; `uptime` before: {r['uptime_start']}; after: "
        f"{r['uptime_end']}); torch {r['torch']}. `{r['command']}`.",
        "",
        f"c={r['level']}, output tok/s over {r['rounds']} rounds (per round in brackets), "
        "systems in turn then reversed. `default`: `--threads` unset, which tries one "
        "thread fewer on its decode steps and keeps the faster; the engine alone runs the "
        "same default. Threads of the default: the share of `packserve:engine_threads` "
        "readings (every 0.5 s) at each count.",
        "",
        "| model | system | out tok/s (per round) | vs all threads | vs engine alone "
        "| TTFT p50 ms | failed |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for m in r["models"]:
        rows = m["table"]
        all_threads = rows[f"HTTP, --threads {cores}"]["tokps"]
        alone = rows[ENGINE]["tokps"]
        for system, x in rows.items():
            per = ", ".join(str(v) for v in x["per_round"])
            lines.append(
                f"| {m['model']} | {system} | {x['tokps']} ({per}) "
                f"| {x['tokps'] / all_threads:.2f} | {x['tokps'] / alone:.2f} "
                f"| {x['ttft_p50_ms']} | {x['failed']} |"
            )
    lines += [""]
    for m in r["models"]:
        shares = ", ".join(f"{n}: {v:.0%}" for n, v in m["default_threads_share"].items())
        lines.append(f"- {m['model']}, threads of the default server: {shares}")
    lines += [
        "",
        "HTTP/engine-only (issue 16's target: >= 0.95 at c=64) is the default's row in "
        "`vs engine alone`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
