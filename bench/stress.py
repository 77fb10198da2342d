"""Stress: 512 streamed requests at once against a packserve server this script starts, every
answer checked for exactness against the offline engine.

The requests are a seeded mix of completions (text and token-id prompts of 1..500 tokens)
and chat, greedy, 1..96 output tokens, half with ignore_eos. Each asks for `logprobs` (the
token strings) and `stream_options.include_usage`; an answer is exact when its token strings,
text, finish reason and usage count equal the offline engine's output for that prompt run
alone. All 512 are sent together (the server runs with --max-queued-requests 1024 so none is
refused; --max-num-seqs 128 by default). Afterwards the engine must be idle (no KV block in
use) and the server must drain on SIGTERM and exit 0.

    .venv/bin/python -m bench.stress                  # 512 requests, tiny model
    .venv/bin/python -m bench.stress --requests 64    # a short check (writes stress.short.*)
    .venv/bin/python -m bench.stress --batch-invariant --model smollm2 --name stress_smollm2

With `--batch-invariant` the server and the offline engine both run in that mode, where
every answer must be exact (no near-tie exception). `--model smollm2` is the default real
model (SmolLM2-135M-Instruct). Writes bench/results/<name>.json (the summary) and .md (default
stress); each request's record goes to bench/results/raw/<name>.requests.json, which git ignores.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.prefill import cpu_model
from packserve.server.launcher import launch

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["river", "stone", "light", "window", "paper", "garden", "music", "silver", "engine"]


def gauges(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    names = {
        "packserve:num_requests_running": "running",
        "packserve:num_requests_waiting": "waiting",
        "packserve:kv_cache_usage_perc": "kv",
    }
    out: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=30.0).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names:
                out[names[s.name]] = s.value
    return out


def workload(engine: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """n seeded requests, each with the offline engine's answer for its prompt alone (the
    engine runs the server's number of intra-op threads: float32 sums in another order can
    flip a near tie; one prompt of the 512 does, between 1 and 2 threads)."""
    from packserve.scheduler import SamplingParams

    rng = random.Random(seed)
    tok = engine.tokenizer
    vocab = engine.model.config.vocab_size
    reqs = []
    for i in range(n):
        max_tokens = rng.choice([1, 2, 4, 8, 16, 32, 48, 64, 96])
        ignore_eos = rng.random() < 0.5
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}
        if ignore_eos:
            body["ignore_eos"] = True
        if i % 4 == 3:
            content = f"Stress chat {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 100)))
            messages = [{"role": "user", "content": content}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = list(tok(text, add_special_tokens=False).input_ids)
            body |= {"messages": messages, "logprobs": True, "top_logprobs": 0}
            path = "/v1/chat/completions"
        else:
            if i % 2 == 0:
                prompt: Any = [rng.randrange(6, vocab) for _ in range(rng.randint(1, 500))]
                ids = prompt
            else:
                prompt = f"Stress {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(0, 200)))
                ids = list(tok(prompt).input_ids)
            body |= {"prompt": prompt, "logprobs": 0}
            path = "/v1/completions"
        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos, logprobs=2
        )
        exp = engine.generate([ids], params)[0]
        # how close each greedy choice was alone: best logit minus the runner-up's
        gaps = [e.top[0][1] - e.top[1][1] if len(e.top) > 1 else None for e in exp.logprobs]
        reqs.append(
            {
                "path": path,
                "body": body,
                "prompt_tokens": len(ids),
                "tokens": [tok.decode([t]) for t in exp.token_ids],
                "text": exp.text,
                "finish_reason": exp.finish_reason,
                "gaps": gaps,
            }
        )
    return reqs


def check(req: dict[str, Any], status: int, events: list[Any]) -> str | None:
    """None if the streamed answer is exact, else what differs."""
    if status != 200:
        return f"status {status}: {events[:1]}"
    if not events or events[-1] != "[DONE]":
        return "no [DONE]"
    chunks = events[:-1]
    if any("error" in c for c in chunks):
        return f"error event {[c for c in chunks if 'error' in c][:1]}"
    usage = chunks[-1].get("usage") if chunks else None
    if not usage or chunks[-1]["choices"]:
        return "no usage chunk at the end"
    text, tokens, finish = "", [], None
    for c in chunks[:-1]:
        for choice in c["choices"]:
            if req["path"] == "/v1/completions":
                text += choice["text"]
                tokens += choice["logprobs"]["tokens"] if choice["logprobs"] else []
            else:
                text += choice["delta"].get("content") or ""
                if choice["logprobs"]:
                    tokens += [e["token"] for e in choice["logprobs"]["content"]]
            finish = choice["finish_reason"] or finish
    if tokens != req["tokens"]:
        at = next(
            (i for i, (a, b) in enumerate(zip(tokens, req["tokens"], strict=False)) if a != b),
            min(len(tokens), len(req["tokens"])),
        )
        gap = req["gaps"][at] if at < len(req["gaps"]) else None
        return (
            f"{req['path']}, prompt {req['prompt_tokens']} tokens: tokens differ from token {at} "
            f"on: {tokens[at : at + 3]} != {req['tokens'][at : at + 3]} (alone, the best "
            f"logprob there led the runner-up by {gap})"
        )
    if text != req["text"]:
        return f"text differs: {text[:60]!r} != {req['text'][:60]!r}"
    if finish != req["finish_reason"]:
        return f"finish_reason {finish} != {req['finish_reason']}"
    if usage["completion_tokens"] != len(req["tokens"]):
        return f"usage {usage['completion_tokens']} != {len(req['tokens'])} tokens"
    if usage["prompt_tokens"] != req["prompt_tokens"]:
        return f"prompt_tokens {usage['prompt_tokens']} != {req['prompt_tokens']}"
    return None


async def fire(url: str, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    n = len(reqs)
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    timeout = httpx.Timeout(600.0, connect=60.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(req: dict[str, Any]) -> dict[str, Any]:
            payload = {**req["body"], "stream": True, "stream_options": {"include_usage": True}}
            start = time.monotonic()
            first = None
            try:
                async with client.stream("POST", req["path"], json=payload) as r:
                    if r.status_code != 200:
                        return {
                            "problem": check(req, r.status_code, [await r.aread()]),
                            "latency_s": time.monotonic() - start,
                            "ttft_s": None,
                        }
                    events: list[Any] = []
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        if first is None:
                            first = time.monotonic() - start
                problem = check(req, 200, events)
            except (httpx.HTTPError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            return {"problem": problem, "latency_s": time.monotonic() - start, "ttft_s": first}

        return await asyncio.gather(*(one(r) for r in reqs))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Stress: {r['requests']} concurrent streamed requests",
        "",
        f"Verdict: **{'PASS' if r['passed'] else 'FAIL'}** (every answer equal, token for "
        "token, to its prompt run alone through the offline engine; no KV block in use "
        "afterwards; exit 0 on SIGTERM).",
        "",
        "| | value |",
        "|---|---|",
        f"| requests | {r['requests']} |",
        f"| failures | {r['failures']} |",
        f"| seconds | {r['seconds']:.1f} |",
        f"| generated tokens | {r['generated_tokens']} ({r['tokens_per_s']:.0f} tokens/s) |",
        f"| latency p50 / p99 (s) | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} |",
        f"| TTFT p50 / p99 (s) | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} |",
        f"| peak running / waiting | {r['peak_running']:.0f} / {r['peak_waiting']:.0f} |",
        f"| KV blocks in use after | {r['kv_blocks_after']} of {r['kv_blocks']} |",
        f"| gauges after (running, waiting, KV) | {r['idle_after']} |",
        f"| exit code after SIGTERM | {r['exit_code']} |",
        "",
        f"Server flags: `{' '.join(r['server_flags'])}`, OMP_NUM_THREADS={r['threads']} "
        f"(the offline engine ran with as many); mix: {r['mix']}; "
        f"offline expected outputs took {r['offline_s']:.0f} s.",
        "",
        f"Model: {Path(r['model']).name}. Machine: {r['machine']}.",
    ]
    if r["errors"]:
        lines += ["", "First failures:", ""] + [f"- `{e}`" for e in r["errors"]]
        lines += [
            "",
            "A lead near 0 is a near-tie when the prompt runs alone; in the default mode a batch "
            "moves the logits by float rounding and the tie can go the other way, so the output "
            "differs from there on (the default mode's contract, "
            "tests/reliability/test_batch_invariance.py). With --batch-invariant no answer may "
            "differ at all.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--seed", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads, the server's (OMP_NUM_THREADS) and the offline engine's",
    )
    ap.add_argument(
        "--model", default=None, help="model folder, or smollm2 (default: the tiny model)"
    )
    ap.add_argument("--batch-invariant", action="store_true", help="server and offline engine")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default=None, help="file stem (default stress, or stress.short)")
    args = ap.parse_args()

    from packserve.engine import Engine, EngineConfig
    from packserve.models import smollm2
    from packserve.models.model_maker import default_model_dir

    if args.model == "smollm2":
        args.model = str(smollm2.default_model_dir())
    model = args.model or str(default_model_dir("tiny"))
    name = args.name or ("stress" if args.requests >= 512 else "stress.short")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    engine = Engine(
        EngineConfig(model=model, batch_invariant=args.batch_invariant, threads=args.threads)
    )
    reqs = workload(engine, args.requests, args.seed)
    offline_s = time.monotonic() - t0
    del engine
    print(f"offline expected outputs for {len(reqs)} requests: {offline_s:.0f} s", flush=True)

    flags = ["--max-queued-requests", str(2 * args.requests), "--max-num-seqs"]
    flags.append(str(args.max_num_seqs))
    if args.batch_invariant:
        flags.append("--batch-invariant")
    log_path = Path(tempfile.gettempdir()) / f"packserve-stress-{os.getpid()}.log"
    peak = {"running": 0.0, "waiting": 0.0}
    # stopped on the way out whatever happens (SIGTERM, then SIGKILL after 30 s)
    with launch(
        "--model", model, *flags, threads=args.threads, log_path=log_path, ready_timeout=180
    ) as server:
        url = server.url
        print(f"server pid {server.proc.pid} at {url}, log {log_path}", flush=True)

        async def run() -> list[dict[str, Any]]:
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    with contextlib.suppress(httpx.HTTPError):
                        g = await asyncio.to_thread(gauges, url)
                        for k in peak:
                            peak[k] = max(peak[k], g.get(k, 0.0))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            try:
                return await fire(url, reqs)
            finally:
                done.set()
                await sampler

        start = time.monotonic()
        results = asyncio.run(run())
        seconds = time.monotonic() - start
        idle: dict[str, float] = {}
        for _ in range(150):  # bounded: the engine lets go of everything
            idle = gauges(url)
            if idle.get("running") == 0 and idle.get("waiting") == 0 and idle.get("kv") == 0:
                break
            time.sleep(0.2)
        feed = httpx.get(url + "/dashboard/feed", timeout=30.0).json()["summary"]
        kv_blocks = feed["kv_blocks"]
        kv_after = round(idle.get("kv", 1.0) * kv_blocks)
        code = server.stop(timeout=120)  # SIGTERM: drains; SIGKILL (-9) if not done by then

    problems = [f"request {i}: {r['problem']}" for i, r in enumerate(results) if r["problem"]]
    latencies = [r["latency_s"] for r in results]
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    generated = sum(len(q["tokens"]) for q in reqs)
    mix: dict[str, int] = {}
    for q in reqs:
        kind = "chat" if q["path"].endswith("chat/completions") else "completion"
        mix[kind] = mix.get(kind, 0) + 1
    result = {
        "passed": not problems and kv_after == 0 and code == 0,
        "requests": len(reqs),
        "failures": len(problems),
        "errors": problems[:20],
        "seconds": round(seconds, 2),
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": pct(latencies, 0.99),
        "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p99_s": pct(ttfts, 0.99),
        "peak_running": peak["running"],
        "peak_waiting": peak["waiting"],
        "kv_blocks_after": kv_after,
        "kv_blocks": kv_blocks,
        "idle_after": [idle.get("running"), idle.get("waiting"), idle.get("kv")],
        "exit_code": code,
        "server_flags": flags,
        "threads": args.threads,
        "mix": mix,
        "offline_s": round(offline_s, 1),
        "seed": args.seed,
        "model": model,
        "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end (shared machine)",
    }
    records = [
        {
            "path": q["path"],
            "prompt_tokens": q["prompt_tokens"],
            "max_tokens": q["body"]["max_tokens"],
            "completion_tokens": len(q["tokens"]),
            "latency_s": round(r["latency_s"], 3),
            "ttft_s": None if r["ttft_s"] is None else round(r["ttft_s"], 3),
            "ok": r["problem"] is None,
        }
        for q, r in zip(reqs, results, strict=True)
    ]
    raw = out / "raw" / f"{name}.requests.json"  # .gitignore: bench/results/raw/
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(records) + "\n")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
