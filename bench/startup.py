"""Operator-facing start-up times: `packserve --help`, a start that must fail (a taken port,
a missing model), and a start to /ready on the tiny model. Baseline, side by side: the bare
interpreter (`python -c pass`), the floor for any command.

    .venv/bin/python -m bench.startup        # 5 runs each

Writes results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.prefill import cpu_model
from packserve.models.model_maker import default_model_dir
from packserve.server.launcher import SERVE_COMMAND, launch

RESULTS = Path(__file__).parent / "results"
CLI = (sys.executable, "-m", "packserve.server.cli")


def timed(argv: list[str] | tuple[str, ...]) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_")}
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    return time.perf_counter() - start, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tiny = str(default_model_dir("tiny"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "packserve --help": [*CLI, "--help"],
            "packserve serve --help": [*CLI, "serve", "--help"],
            "serve on a taken port (exit 1)": [*SERVE_COMMAND, "--model", tiny, "--port", port],
            "serve a missing model (exit 1)": [*SERVE_COMMAND, "--model", "/no/such/model"],
        }
        rows = {}
        for name, argv in cases.items():
            runs = [timed(argv) for _ in range(args.runs)]
            rows[name] = {
                "median_s": round(statistics.median(t for t, _ in runs), 3),
                "max_s": round(max(t for t, _ in runs), 3),
                "exit_codes": sorted({rc for _, rc in runs}),
            }
    ready = []
    for _ in range(args.runs):
        start = time.perf_counter()
        with launch("--model", tiny):
            ready.append(time.perf_counter() - start)
    rows["serve the tiny model to /ready"] = {
        "median_s": round(statistics.median(ready), 3),
        "max_s": round(max(ready), 3),
        "exit_codes": [0],
    }
    floor = rows["python -c pass"]["median_s"]
    summary = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "runs": args.runs,
        "rows": rows,
        "help_over_python": round(rows["packserve --help"]["median_s"] / floor, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = "\n".join(
        f"| {name} | {r['median_s']} | {r['max_s']} | {r['exit_codes']} |"
        for name, r in rows.items()
    )
    (args.out / "startup.md").write_text(
        f"# Start-up times ({args.runs} runs each)\n\n"
        f"{summary['machine']['cpu']}, {summary['machine']['cores']} cores.\n\n"
        "| command | median s | max s | exit codes |\n|---|---|---|---|\n"
        f"{table}\n\n`packserve --help` / `python -c pass` = {summary['help_over_python']}.\n"
        "Command: `.venv/bin/python -m bench.startup`\n"
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
