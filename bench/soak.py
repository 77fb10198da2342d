"""Soak test: steady load against a packserve server that this script starts, for a long time.

Eight clients (``--clients``) loop over a seeded mix of requests (completions and chat,
streamed and not, text and token-id prompts, greedy outputs of 1..64 tokens, a few sampled
ones, a few invalid ones and a few clients that hang up mid-stream). Every greedy answer is
compared with the offline engine's output for the same prompt alone; every other answer is
checked for its shape (status, token counts, error body). Every ``--interval`` seconds the
server process's resident memory (``VmRSS`` in /proc/PID/status) and its open file
descriptors (``len(os.listdir("/proc/PID/fd"))``) are sampled, with the KV/running/waiting
gauges from /metrics.

Growth is measured after the warm-up (the first ``--warmup-minutes``, default 5, or a third
of a short run): the median of the samples in the first minute after the warm-up against the
median of the samples in the last minute. The run passes when both RSS and FD growth are
below ``--max-growth-pct`` (5 %), no request failed, the engine is idle afterwards (KV usage,
running and waiting at 0) and the server drains on SIGTERM with exit code 0.

    .venv/bin/python -m bench.soak                 # 30 minutes
    .venv/bin/python -m bench.soak --minutes 2     # a short check (writes soak.short.*)

Writes ``bench/results/soak.json``, ``soak.md`` and ``soak.png`` (``soak.short.*`` for runs
shorter than 30 minutes unless ``--name`` says otherwise). Traffic goes to 127.0.0.1 only.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.prefill import cpu_model
from packserve.server.launcher import launch

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "river",
    "stone",
    "light",
    "window",
    "paper",
    "garden",
    "music",
    "number",
    "silver",
    "forest",
    "engine",
    "letter",
    "morning",
    "table",
    "voice",
    "mountain",
    "ocean",
    "circle",
    "bridge",
    "story",
]


# -- the server -----------------------------------------------------------------------------------


def process_sample(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def gauges(url: str) -> dict[str, float]:
    """running / waiting / KV usage from /metrics (read at scrape time by the server)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", timeout=30.0)
    out = {"running": -1.0, "waiting": -1.0, "kv": -1.0}
    names = {
        "packserve:num_requests_running": "running",
        "packserve:num_requests_waiting": "waiting",
        "packserve:kv_cache_usage_perc": "kv",
    }
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name in names:
                out[names[s.name]] = s.value
    return out


# -- the workload ---------------------------------------------------------------------------------


@dataclass
class Spec:
    """One request of the mix and what its answer must be."""

    name: str
    path: str
    body: dict[str, Any]
    stream: bool
    expected_text: str | None = None  # greedy: the offline engine's text
    expected_tokens: int | None = None  # exact completion_tokens when known
    status: int = 200
    hang_up_after: int = 0  # >0: read that many events, then close the connection
    counts: dict[str, int] = field(default_factory=dict)


def build_mix(engine: Any, seed: int) -> list[Spec]:
    """A seeded list of requests, with the offline engine's answers for the greedy ones."""
    from packserve.scheduler import SamplingParams

    rng = random.Random(seed)
    tok = engine.tokenizer
    vocab = engine.model.config.vocab_size
    specs: list[Spec] = []
    for i in range(24):
        kind = i % 6
        max_tokens = rng.choice([1, 3, 8, 16, 32, 64])
        ignore_eos = rng.random() < 0.5
        if kind in (0, 1, 2):  # completions, text or token ids
            if kind == 2:
                prompt: Any = [rng.randrange(6, vocab) for _ in range(rng.randint(1, 300))]
            else:
                prompt = f"Soak {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            ids = prompt
            path = "/v1/completions"
        else:  # chat
            content = " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
            messages = [{"role": "user", "content": f"Soak chat {i}: {content}"}]
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = list(tok(text, add_special_tokens=False).input_ids)
            path = "/v1/chat/completions"
        if ignore_eos:
            body["ignore_eos"] = True
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        out = engine.generate([ids], params)[0]
        stream = i % 2 == 0
        specs.append(Spec(f"greedy-{i}", path, body, stream, out.text, len(out.token_ids)))
    # sampled with a seed, n=2: only the shape and the token counts are checked
    for i in range(4):
        body = {
            "prompt": f"Sampled {i} " + " ".join(rng.choices(WORDS, k=8)),
            "max_tokens": 24,
            "temperature": 0.9,
            "top_p": 0.9,
            "seed": 1000 + i,
            "n": 2,
            "ignore_eos": True,
        }
        specs.append(Spec(f"sampled-{i}", "/v1/completions", body, i % 2 == 0, None, 48))
    # invalid: a 400 with an error object
    specs.append(
        Spec("invalid", "/v1/completions", {"prompt": "x", "temperature": -1}, False, status=400)
    )
    # clients that leave mid-stream
    for i in range(3):
        body = {"prompt": f"Leave {i} early", "max_tokens": 256, "ignore_eos": True}
        specs.append(Spec(f"hangup-{i}", "/v1/completions", body, True, hang_up_after=2 + i))
    return specs


def text_of(path: str, choice: dict[str, Any], streamed: bool) -> str:
    if path == "/v1/completions":
        return choice["text"]
    if streamed:
        return choice["delta"].get("content") or ""
    return choice["message"]["content"]


async def run_one(client: httpx.AsyncClient, url: str, spec: Spec) -> str | None:
    """Send one request; None if the answer is right, else what was wrong."""
    if spec.hang_up_after:
        # a fresh connection that is closed mid-stream, as a client that goes away would
        async with (
            httpx.AsyncClient(base_url=url, timeout=120.0) as own,
            own.stream("POST", spec.path, json={**spec.body, "stream": True}) as r,
        ):
            if r.status_code != 200:
                return f"status {r.status_code}"
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= spec.hang_up_after:
                    return None
        return f"stream ended after {seen} events"
    if spec.status != 200:
        r = await client.post(spec.path, json=spec.body)
        body = r.json()
        ok = r.status_code == spec.status and set(body) == {"error"}
        return None if ok else f"status {r.status_code}: {r.text[:200]}"
    if not spec.stream:
        r = await client.post(spec.path, json=spec.body)
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        out = r.json()
        texts = [text_of(spec.path, c, False) for c in out["choices"]]
        usage = out["usage"]["completion_tokens"]
    else:
        payload = {**spec.body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", spec.path, json=payload) as r:
            if r.status_code != 200:
                return f"status {r.status_code}: {(await r.aread())[:200]!r}"
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream did not end with [DONE]: {events[-2:]}"
        chunks = [json.loads(e) for e in events[:-1]]
        if any("error" in c for c in chunks):
            return f"error event: {chunks}"
        n = spec.body.get("n", 1)
        parts: list[list[str]] = [[] for _ in range(n)]
        for c in chunks:
            for choice in c["choices"]:
                parts[choice["index"]].append(text_of(spec.path, choice, True))
        texts = ["".join(p) for p in parts]
        usage = chunks[-1]["usage"]["completion_tokens"]
    if spec.expected_text is not None and texts != [spec.expected_text]:
        return f"text differs: {texts!r} != {spec.expected_text!r}"
    if spec.expected_tokens is not None and usage != spec.expected_tokens:
        return f"completion_tokens {usage} != {spec.expected_tokens}"
    return None


@dataclass
class Tally:
    requests: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)


async def client_loop(
    client: httpx.AsyncClient,
    url: str,
    specs: list[Spec],
    rng: random.Random,
    deadline: float,
    tally: Tally,
) -> None:
    while time.monotonic() < deadline:
        spec = rng.choice(specs)
        kind = spec.name.split("-")[0]
        try:
            problem = await run_one(client, url, spec)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        tally.requests += 1
        tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1
        if problem is not None:
            tally.failures += 1
            if len(tally.errors) < 20:
                tally.errors.append(f"{spec.name}: {problem}")


async def sampler(
    url: str,
    pid: int,
    start: float,
    deadline: float,
    interval: float,
    samples: list[dict[str, float]],
    tally: Tally,
) -> None:
    while True:
        rss, fds = process_sample(pid)
        g: dict[str, float] = {}
        with contextlib.suppress(httpx.HTTPError):
            g = await asyncio.to_thread(gauges, url)
        samples.append(
            {
                "t_s": round(time.monotonic() - start, 2),
                "rss_kib": rss,
                "fds": fds,
                "requests": tally.requests,
                "failures": tally.failures,
                "loadavg_1m": os.getloadavg()[0],
                **g,
            }
        )
        if time.monotonic() + interval > deadline:
            return
        await asyncio.sleep(interval - (time.monotonic() - start) % interval)


async def run_load(
    url: str,
    pid: int,
    specs: list[Spec],
    minutes: float,
    clients: int,
    interval: float,
    seed: int,
) -> tuple[Tally, list[dict[str, float]], float]:
    tally = Tally()
    samples: list[dict[str, float]] = []
    start = time.monotonic()
    deadline = start + minutes * 60
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(180.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        loops = [
            client_loop(client, url, specs, random.Random(seed * 1000 + c), deadline, tally)
            for c in range(clients)
        ]
        await asyncio.gather(sampler(url, pid, start, deadline, interval, samples, tally), *loops)
    return tally, samples, time.monotonic() - start


# -- analysis and reports -------------------------------------------------------------------------


def growth(
    samples: list[dict[str, float]], key: str, warmup_s: float, how: str = "median"
) -> dict[str, float]:
    """The first minute after warm-up vs. the last minute, each summarized by its median
    (RSS) or its minimum (FDs: the clients' connections come and go, and one more open
    socket at a sampling instant is 5 % of ~16; a leak raises the floor, a transient
    connection does not)."""
    pick = statistics.median if how == "median" else min
    post = [s for s in samples if s["t_s"] >= warmup_s]
    if len(post) < 2:
        post = samples[-2:]
    t0 = post[0]["t_s"]
    t1 = post[-1]["t_s"]
    window = min(60.0, (t1 - t0) / 2) if t1 > t0 else 0.0
    first = [s[key] for s in post if s["t_s"] <= t0 + window] or [post[0][key]]
    last = [s[key] for s in post if s["t_s"] >= t1 - window] or [post[-1][key]]
    base = pick(first)
    final = pick(last)
    peak = max(s[key] for s in post)
    return {
        "baseline": base,
        "final": final,
        "peak_after_warmup": peak,
        "growth_pct": 100.0 * (final - base) / base if base else 0.0,
        "peak_growth_pct": 100.0 * (peak - base) / base if base else 0.0,
    }


def plot(samples: list[dict[str, float]], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(t, [s["rss_kib"] / 1024 for s in samples], color="tab:blue")
    ax1.set_ylabel("RSS (MiB)")
    ax2.plot(t, [s["fds"] for s in samples], color="tab:orange")
    ax2.set_ylabel("open file descriptors")
    ax2.set_xlabel("minutes")
    for ax in (ax1, ax2):
        ax.axvspan(0, warmup_s / 60, color="0.9", label="warm-up")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax1.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    rss, fds = result["rss"], result["fds"]
    lines = [
        f"# Soak: {result['minutes']} minutes, {result['clients']} clients",
        "",
        f"Verdict: **{'PASS' if result['passed'] else 'FAIL'}** "
        f"(growth after the {result['warmup_minutes']}-minute warm-up must stay below "
        f"{result['max_growth_pct']} %; no failed request; idle and exit 0 afterwards).",
        "",
        "| | value |",
        "|---|---|",
        f"| requests | {result['requests']} |",
        f"| failures | {result['failures']} |",
        f"| seconds | {result['seconds']:.0f} |",
        f"| requests/s | {result['requests'] / result['seconds']:.2f} |",
        f"| RSS baseline -> final (MiB) | {rss['baseline'] / 1024:.1f} -> "
        f"{rss['final'] / 1024:.1f} |",
        f"| RSS growth after warm-up | {rss['growth_pct']:+.2f} % "
        f"({(rss['final'] - rss['baseline']) / 1024:+.1f} MiB; "
        f"peak {rss['peak_growth_pct']:+.2f} %) |",
        f"| FDs baseline -> final | {fds['baseline']:.0f} -> {fds['final']:.0f} |",
        f"| FD growth after warm-up | {fds['growth_pct']:+.2f} % "
        f"(peak {fds['peak_growth_pct']:+.2f} %) |",
        f"| RSS / FDs idle after the load | {result['rss_kib_idle_after'] / 1024:.1f} MiB / "
        f"{result['fds_idle_after']} |",
        f"| KV blocks in use after the load | {result['kv_blocks_used_after']} |",
        f"| gauges after the load (running, waiting, KV) | {result['idle_after']} |",
        f"| exit code after SIGTERM | {result['exit_code']} |",
        "",
        f"Requests by kind: {result['by_kind']}.",
        "",
        "RSS includes the KV pool, allocated whole at start (`--kv-cache-memory-mb`, 1 GiB "
        "by default), so the absolute growth in MiB is the sharper number. "
        "Growth: the samples of the first minute after the warm-up against the last "
        "minute's, RSS by their median, FDs by their minimum (client connections come and "
        "go; a leak raises the floor). Samples every "
        f"{result['interval_s']} s of the server process's VmRSS and "
        "`len(os.listdir(/proc/PID/fd))`; see soak.json for every sample and soak.png.",
        "",
        f"Machine: {result['machine']}.",
    ]
    if result["errors"]:
        lines += ["", "First failures:", ""] + [f"- `{e}`" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--max-growth-pct", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default=None, help="file stem (default soak, or soak.short)")
    args = ap.parse_args()

    from packserve.engine import Engine, EngineConfig
    from packserve.models.model_maker import default_model_dir

    model = args.model or str(default_model_dir("tiny"))
    warmup = args.warmup_minutes
    if warmup is None:
        warmup = min(5.0, args.minutes / 3)
    name = args.name or ("soak" if args.minutes >= 30 else "soak.short")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"offline expected outputs ({model}) ...", flush=True)
    engine = Engine(EngineConfig(model=model))
    specs = build_mix(engine, args.seed)
    del engine

    log_path = Path(tempfile.gettempdir()) / f"packserve-soak-{os.getpid()}.log"
    # stopped on the way out whatever happens (SIGTERM, then SIGKILL after 30 s)
    with launch("--model", model, log_path=log_path, ready_timeout=180) as server:
        url, pid = server.url, server.proc.pid
        print(f"server pid {pid} at {url}, log {log_path}", flush=True)
        tally, samples, seconds = asyncio.run(
            run_load(url, pid, specs, args.minutes, args.clients, args.interval, args.seed)
        )
        # afterwards: the engine must be idle (bounded poll), then drain and exit 0
        idle: dict[str, float] = {}
        for _ in range(100):
            idle = gauges(url)
            if idle["running"] == 0 and idle["waiting"] == 0 and idle["kv"] == 0:
                break
            time.sleep(0.2)
        rss_idle, fds_idle = process_sample(pid)
        code = server.stop(timeout=120)  # SIGTERM: drains; SIGKILL (-9) if not done by then

    warmup_s = warmup * 60
    rss = growth(samples, "rss_kib", warmup_s)
    fds = growth(samples, "fds", warmup_s, how="min")
    is_idle = idle.get("running") == 0 and idle.get("waiting") == 0 and idle.get("kv") == 0
    passed = (
        tally.failures == 0
        and rss["growth_pct"] < args.max_growth_pct
        and fds["growth_pct"] < args.max_growth_pct
        and is_idle
        and code == 0
    )
    result = {
        "passed": passed,
        "minutes": args.minutes,
        "warmup_minutes": warmup,
        "clients": args.clients,
        "interval_s": args.interval,
        "max_growth_pct": args.max_growth_pct,
        "seed": args.seed,
        "model": model,
        "requests": tally.requests,
        "failures": tally.failures,
        "errors": tally.errors,
        "by_kind": tally.by_kind,
        "seconds": round(seconds, 1),
        "rss": rss,
        "fds": fds,
        "rss_kib_idle_after": rss_idle,
        "fds_idle_after": fds_idle,
        "idle_after": [idle.get("running"), idle.get("waiting"), idle.get("kv")],
        "kv_blocks_used_after": "0" if idle.get("kv") == 0 else f"usage {idle.get('kv')}",
        "exit_code": code,
        "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"load average at the end {os.getloadavg()[0]:.1f} (shared machine)",
        "samples": samples,
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    title = (
        f"packserve soak: {args.minutes:g} min, {args.clients} clients, "
        f"RSS {rss['growth_pct']:+.1f} %, FDs {fds['growth_pct']:+.1f} % after warm-up"
    )
    plot(samples, warmup_s, out / f"{name}.png", title)
    print(markdown(result), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
