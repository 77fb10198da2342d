#!/usr/bin/env python3
"""Capacity of one packserve replica: requests/s and tokens/s at a few concurrency levels.

Closed loop: at each level, C clients each send one streamed completion after another (the
same prompt length and exactly --max-tokens generated tokens: ignore_eos) for --duration
seconds; requests started before the end run to completion. Throughput is counted over the
level's wall time. Everything is bounded: the duration, a per-request timeout, and an optional
cap on requests per level.

    .venv/bin/python deploy/ci/capacity.py                      # starts its own replica
    .venv/bin/python deploy/ci/capacity.py --url http://127.0.0.1:8000 --concurrency 1,8
    .venv/bin/python deploy/ci/capacity.py --json out.json      # the numbers, machine-readable

Without --url it starts `packserve serve` (the built-in tiny model unless --model) on a free
loopback port, and stops it at the end. The client runs on the same machine as the server and
takes some of its CPU: on a small machine that lowers the numbers a little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from packserve.server.launcher import READY_TIMEOUT_S, ServerProcess, ServerStartError

TEXT = (
    "the of and to in is was for on that with as by at from this be are it an or which have "
    "has one all their there were been more when will would who out so can time some other "
    "about into only over new after first most also made many these two may such then them "
    "model server token prompt stream batch cache request replica packing queue latency"
)
WORDS = TEXT.split()


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    latency_s: float
    error: str = ""


@dataclass
class Level:
    """The measurement at one concurrency level."""

    concurrency: int
    requests: int
    failed: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def prompts(client: httpx.AsyncClient, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` token ids, made of words and tokenized by
    the server itself (so this works for any model)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(length * 2))
        r = await client.post("/tokenize", json={"prompt": text})
        r.raise_for_status()
        ids = r.json()["tokens"]
        if len(ids) < length:
            raise SystemExit(f"could not make a {length}-token prompt")
        out.append(ids[:length])
    return out


async def one_request(
    client: httpx.AsyncClient, prompt: list[int], max_tokens: int, timeout: float
) -> Result:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = float("nan")
    usage: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return Result(False, 0, 0, ttft, time.perf_counter() - start, r.text[:200])
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(event["error"])
                    if ttft != ttft and any(c.get("text") for c in event.get("choices", [])):
                        ttft = time.perf_counter() - start
                    usage = event.get("usage") or usage
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        return Result(False, 0, 0, ttft, time.perf_counter() - start, repr(exc)[:200])
    latency = time.perf_counter() - start
    done = usage.get("completion_tokens") == max_tokens
    return Result(
        done,
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        ttft,
        latency,
        "" if done else f"usage {usage}",
    )


async def run_level(
    client: httpx.AsyncClient,
    concurrency: int,
    pool: list[list[int]],
    max_tokens: int,
    duration: float,
    max_requests: int | None,
    timeout: float,
) -> Level:
    results: list[Result] = []
    started = 0
    start = time.perf_counter()
    stop_at = start + duration

    async def worker(n: int) -> None:
        nonlocal started
        while time.perf_counter() < stop_at and (max_requests is None or started < max_requests):
            prompt = pool[(started + n) % len(pool)]
            started += 1
            results.append(await one_request(client, prompt, max_tokens, timeout))

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    output = sum(r.completion_tokens for r in good)
    total = output + sum(r.prompt_tokens for r in good)
    ttfts = [r.ttft_s for r in good if r.ttft_s == r.ttft_s]
    latencies = [r.latency_s for r in good]
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"  {len(failed)} failed, e.g. {failed[0].error}", file=sys.stderr)
    return Level(
        concurrency=concurrency,
        requests=len(good),
        failed=len(failed),
        wall_s=round(wall, 3),
        requests_per_s=round(len(good) / wall, 3),
        output_tokens_per_s=round(output / wall, 1),
        total_tokens_per_s=round(total / wall, 1),
        ttft_p50_s=round(percentile(ttfts, 0.5), 4),
        ttft_p99_s=round(percentile(ttfts, 0.99), 4),
        latency_p50_s=round(percentile(latencies, 0.5), 4),
        latency_p99_s=round(percentile(latencies, 0.99), 4),
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    with contextlib.suppress(OSError, ValueError):
        info["memory_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def start_replica(model: str | None, extra: list[str], timeout: float) -> ServerProcess:
    """`packserve serve` on a free loopback port, ready (GET /ready is 200)."""
    flags = [*extra, *(["--model", model] if model else [])]
    # The server logs a line per request: into a file, never a pipe nobody reads.
    server = ServerProcess(flags, ready_timeout=timeout)
    print(f"replica log: {server.log_path}", file=sys.stderr)
    try:
        return server.start()
    except ServerStartError as exc:
        raise SystemExit(str(exc)) from None


def markdown(levels: list[Level]) -> str:
    head = (
        "| concurrency | requests | failed | requests/s | output tokens/s | total tokens/s "
        "| TTFT p50 | TTFT p99 | latency p50 | latency p99 |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = "".join(
        f"| {v.concurrency} | {v.requests} | {v.failed} | {v.requests_per_s:.2f} "
        f"| {v.output_tokens_per_s:.0f} | {v.total_tokens_per_s:.0f} "
        f"| {v.ttft_p50_s * 1000:.0f} ms | {v.ttft_p99_s * 1000:.0f} ms "
        f"| {v.latency_p50_s:.2f} s | {v.latency_p99_s:.2f} s |\n"
        for v in levels
    )
    return head + rows


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(args.timeout), limits=limits
    ) as client:
        model = (await client.get("/v1/models")).json()["data"][0]
        pool = await prompts(client, 32, args.prompt_tokens, args.seed)
        # Warm-up (first-call allocations), not counted.
        for prompt in pool[:2]:
            await one_request(client, prompt, min(args.max_tokens, 8), args.timeout)
        levels = []
        for c in args.concurrency:
            level = await run_level(
                client, c, pool, args.max_tokens, args.duration, args.requests, args.timeout
            )
            print(
                f"concurrency {c}: {level.requests_per_s:.2f} req/s, "
                f"{level.output_tokens_per_s:.0f} output tok/s",
                file=sys.stderr,
            )
            levels.append(level)
    info = machine()
    info["load_average_at_start"] = load_at_start
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "model": model["id"],
        "max_model_len": model.get("max_model_len"),
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "duration_s": args.duration,
        "machine": info,
        "levels": [asdict(v) for v in levels],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running replica (default: start one)")
    parser.add_argument("--model", help="model of the replica this script starts")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra `packserve serve` argument for the replica this script starts (repeatable)",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 16, 64],
        help="comma-separated client counts (default 1,4,16,64)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--requests", type=int, help="at most this many requests per level")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request bound (s)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    replica = None
    url = args.url
    if url is None:
        replica = start_replica(args.model, args.serve_arg, args.ready_timeout)
        url = replica.url
    try:
        report = asyncio.run(measure(args, url.rstrip("/")))
    finally:
        if replica is not None:
            replica.stop()
    levels = [Level(**v) for v in report["levels"]]
    if replica is not None and not any(v.failed for v in levels):
        replica.log_path.unlink()  # kept only when something failed
    m = report["machine"]
    print(
        f"model {report['model']}, prompt {report['prompt_tokens']} tokens, "
        f"{report['max_tokens']} generated tokens per request, {report['duration_s']:.0f} s "
        f"per level; {m['cpu']}, {m['cores']} cores, torch {m.get('torch', '?')}, "
        f"load average {m['load_average_at_start'][0]} at start, "
        f"{m['load_average_at_end'][0]} at end (other processes on the machine)\n"
    )
    print(markdown(levels))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(v.failed for v in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
