"""Time to a refusal under a burst: 1000 connections at once against a small queue.

Every connection sends one request at the same moment. Per request, the time from its
request being written to its response's status line (the latency the client sees), and the
time from the burst's start (which adds the client's own connection setup: one Python
process opening 1000 connections on the same cores). The baseline, side by side in the same
run and server: the same burst to GET /health, the server's floor for accepting and
answering a connection. The figures: 429 latency (median, p99) and its ratio to the probe's.

    .venv/bin/python -m bench.burst                   # 1000 connections, queue 8
    .venv/bin/python -m bench.burst --connections 200 # a quick look

Writes results/burst.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.prefill import cpu_model
from packserve.models.model_maker import default_model_dir
from packserve.server.launcher import launch

RESULTS = Path(__file__).parent / "results"


Result = tuple[int, float, float]  # status, seconds from sending, seconds from the burst's start


async def one(host: str, port: int, request: bytes, start: float) -> Result:
    """Send `request` on a new connection and read the status line."""
    sent = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        sent = time.perf_counter()
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout=120)
        now = time.perf_counter()
        writer.close()
        status = int(line.split()[1]) if line.startswith(b"HTTP/1.1") else -1
        return status, now - sent, now - start
    except (OSError, TimeoutError):
        now = time.perf_counter()
        return -1, now - sent, now - start


async def burst(host: str, port: int, request: bytes, n: int) -> list[Result]:
    start = time.perf_counter()
    return await asyncio.gather(*(one(host, port, request, start) for _ in range(n)))


def http_request(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + "\r\n").encode() + data


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


TIMES = ("refused", "served", "health", "refused_from_start", "health_from_start")


def measure(flags: list[str], connections: int, generate: bytes) -> dict[str, Any]:
    """One server: a warm-up, the /health burst, then the generation burst."""
    probe = http_request("GET", "/health")
    with launch(*flags) as server:
        asyncio.run(burst(server.host, server.port, probe, 50))  # warm-up
        probes = asyncio.run(burst(server.host, server.port, probe, connections))
        time.sleep(1)
        generations = asyncio.run(burst(server.host, server.port, generate, connections))
    statuses: dict[int, int] = {}
    for status, _, _ in generations:
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "refused": [t for s, t, _ in generations if s == 429],
        "served": [t for s, t, _ in generations if s == 200],
        "health": [t for s, t, _ in probes if s == 200],
        "refused_from_start": [t for s, _, t in generations if s == 429],
        "health_from_start": [t for s, _, t in probes if s == 200],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--max-queued-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engines", default="process,thread", help="--engine-process modes")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per mode, interleaved")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    base_flags = [
        "--model",
        str(default_model_dir("tiny")),
        "--max-queued-requests",
        str(args.max_queued_requests),
        "--max-num-seqs",
        "8",
    ]
    generate = http_request(
        "POST",
        "/v1/completions",
        {"prompt": "Write a long story.", "max_tokens": args.max_tokens, "ignore_eos": True},
    )
    modes = args.engines.split(",")
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            flag = ["--engine-process" if mode == "process" else "--no-engine-process"]
            runs[mode].append(measure(base_flags + flag, args.connections, generate))
    per_mode: dict[str, Any] = {}
    for mode, measured in runs.items():
        pooled = {k: [t for r in measured for t in r[k]] for k in TIMES}
        refused, health = quantiles(pooled["refused"]), quantiles(pooled["health"])
        per_mode[mode] = {
            "refused_429": refused,
            "served_200": quantiles(pooled["served"]),
            "health_probe": health,
            "refused_429_p50_per_burst": [quantiles(r["refused"])["p50_ms"] for r in measured],
            "refused_429_p99_per_burst": [quantiles(r["refused"])["p99_ms"] for r in measured],
            "statuses_per_burst": [r["statuses"] for r in measured],
            "errors_5xx": sum(r["errors_5xx"] for r in measured),
            "refusal_over_probe_p50": (
                round(refused["p50_ms"] / health["p50_ms"], 2)
                if refused["p50_ms"] and health["p50_ms"]
                else None
            ),
            "from_burst_start": {
                "refused_429": quantiles(pooled["refused_from_start"]),
                "health_probe": quantiles(pooled["health_from_start"]),
            },
        }
    summary = {
        "config": vars(args) | {"out": str(args.out)},
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1m_before": round(load_before, 2),
        },
        "engines": per_mode,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "burst.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = []
    for mode, m in per_mode.items():
        rows = [
            ("429 (refused)", m["refused_429"]),
            ("200 (served)", m["served_200"]),
            ("GET /health", m["health_probe"]),
        ]
        for name, q in rows:
            lines.append(
                f"| {mode} | {name} | {q['n']} | {q['p50_ms']} | {q['p99_ms']} | {q['max_ms']} |"
            )
    per_burst = "; ".join(
        f"{mode}: 429 p50 {m['refused_429_p50_per_burst']} ms, p99 "
        f"{m['refused_429_p99_per_burst']} ms, 5xx {m['errors_5xx']}"
        for mode, m in per_mode.items()
    )
    (args.out / "burst.md").write_text(
        f"# Burst: {args.connections} connections at once, --max-queued-requests "
        f"{args.max_queued_requests}\n\n"
        f"{summary['machine']['cpu']}, {summary['machine']['cores']} cores (client and server "
        f"share them; load average {load_before:.2f} before); tiny model; {args.repeats} bursts "
        "per engine mode (`--engine-process` or `--no-engine-process`), interleaved, pooled "
        "below. Per request: from writing it to its response's status line.\n\n"
        "| engine | response | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + f"\n\nPer burst: {per_burst}.\n"
        f"Command: `.venv/bin/python -m bench.burst --engines {args.engines} --repeats "
        f"{args.repeats}`\n"
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
