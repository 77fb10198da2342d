"""Serving benchmark: a load generator for any OpenAI-compatible endpoint.

Sends streamed /v1/completions (or /v1/chat/completions) requests with text prompts whose
token lengths follow a seeded lognormal distribution (text cut from `corpus_documents()`,
measured with the model's tokenizer) or come from a JSONL file, and mixed `max_tokens`.
Arrivals are Poisson at `--request-rate` (inf: all at once), optionally capped at
`--max-concurrency` requests in flight. A comma list of concurrencies runs a sweep.

Every response is checked: it must end with a finish_reason and carry exactly `max_tokens`
tokens (from `usage` in the last chunk; without usage the text is re-tokenized), or fewer with
finish_reason "stop". Anything else (HTTP errors, error events, timeouts, truncated streams,
wrong token counts) is a failure, counted and listed, never dropped silently.

Reports request throughput, output and total tokens/s, TTFT, TPOT, ITL and end-to-end latency
(mean, p50, p90, p99), goodput under `--slo-ttft-ms`/`--slo-tpot-ms`; writes a JSON summary
(arguments, and per level its config and summary) and PNG plots (latency CDFs; tokens/s and
TTFT against concurrency when sweeping). The per-request records go to
`raw/<name>.requests.json` next to the summary (git ignores bench/results/raw/).

    .venv/bin/python -m bench.serve --base-url http://127.0.0.1:8000 --tokenizer MODEL_DIR \\
        --num-prompts 64 --max-concurrency 1,4,16 --out bench/results/serve_run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

try:
    from tqdm import tqdm
except ImportError:  # the bar is a nicety; the benchmark runs without it
    tqdm = None  # type: ignore[assignment]


# -- workload --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    prompt_len: int  # tokens, as the model's tokenizer counts `text` (special tokens included)
    max_tokens: int


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 30  # we only count tokens; whole documents are long
    return tokenizer


def _corpus_tokens(tokenizer) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each corpus document with its token offsets (no special tokens)."""
    from packserve.models.corpus import corpus_documents

    docs = [d for d in corpus_documents() if len(d) > 200]
    enc = tokenizer(docs, add_special_tokens=False, return_offsets_mapping=True)
    return [(d, offs) for d, offs in zip(docs, enc["offset_mapping"], strict=True) if offs]


def synthetic_prompts(
    tokenizer,
    num: int,
    seed: int = 0,
    median: float = 100,
    sigma: float = 1.0,
    min_len: int = 8,
    max_len: int = 1000,
    out_min: int = 16,
    out_max: int = 256,
    out_dist: str = "uniform",
) -> list[Prompt]:
    """Text prompts cut from the corpus at token boundaries, lognormal token lengths clipped
    to [min_len, max_len]; max_tokens uniform (or log-uniform) in [out_min, out_max]."""
    rng = random.Random(seed)
    docs = _corpus_tokens(tokenizer)
    longest = max(len(o) for _, o in docs)
    prompts = []
    for _ in range(num):
        want = min(max_len, max(min_len, round(rng.lognormvariate(math.log(median), sigma))))
        want = min(want, longest)
        fitting = [d for d in docs if len(d[1]) >= want]
        text, offs = fitting[rng.randrange(len(fitting))]
        start = rng.randrange(len(offs) - want + 1)
        # One special token (BOS) is added by the server's tokenizer: cut want - 1 tokens.
        body = text[offs[start][0] : offs[start + max(1, want - 1) - 1][1]]
        if out_dist == "loguniform":
            out = round(math.exp(rng.uniform(math.log(out_min), math.log(out_max))))
        else:
            out = rng.randint(out_min, out_max)
        prompts.append(Prompt(body, 0, out))
    lengths = [len(ids) for ids in tokenizer([p.text for p in prompts]).input_ids]
    return [Prompt(p.text, n, p.max_tokens) for p, n in zip(prompts, lengths, strict=True)]


def jsonl_prompts(path: str, tokenizer, num: int, default_max_tokens: int) -> list[Prompt]:
    """{"prompt": str, "max_tokens": int?} per line; cycled to `num` prompts."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no prompts")
    rows = [rows[i % len(rows)] for i in range(num)]
    lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows]).input_ids]
    return [
        Prompt(r["prompt"], n, int(r.get("max_tokens", default_max_tokens)))
        for r, n in zip(rows, lengths, strict=True)
    ]


# -- one request -----------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """What one request measured; times in seconds relative to its own send time."""

    index: int
    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    finish_reason: str | None = None
    output_tokens: int = 0
    tokens_from: str = ""  # usage or retokenized
    server_prompt_tokens: int | None = None
    start: float = 0.0  # perf_counter at send
    ttft: float | None = None
    latency: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # content chunk arrivals, rel.
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass(frozen=True, slots=True)
class Target:
    base_url: str
    model: str | None
    endpoint: str = "completions"  # or chat
    temperature: float = 0.0
    ignore_eos: bool = True
    include_usage: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout: float = 600.0  # whole request
    read_timeout: float = 120.0  # between two bytes of the stream


def _body(target: Target, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": prompt.max_tokens,
        "temperature": target.temperature,
        "stream": True,
    }
    if target.model:
        body["model"] = target.model
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(target.extra_body)
    return body


def _content(choice: dict[str, Any], chat: bool) -> str:
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send(client: httpx.AsyncClient, target: Target, prompt: Prompt, rec: Record) -> None:
    """Stream one request into `rec`; never raises (errors land in rec.error)."""
    url = target.base_url.rstrip("/") + (
        "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
    )
    chat = target.endpoint == "chat"
    parts: list[str] = []
    usage = None
    rec.start = time.perf_counter()
    try:
        async with asyncio.timeout(target.request_timeout):
            async with client.stream("POST", url, json=_body(target, prompt)) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:300]
                    rec.error = f"HTTP {resp.status_code}: {detail}"
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter() - rec.start
                    event = json.loads(data)
                    if "error" in event:
                        rec.error = f"error event: {json.dumps(event['error'])[:300]}"
                        return
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or ():
                        text = _content(choice, chat)
                        if text:
                            if rec.ttft is None:
                                rec.ttft = now
                            rec.chunk_times.append(now)
                            parts.append(text)
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
        rec.latency = time.perf_counter() - rec.start
    except TimeoutError:
        rec.error = f"timeout after {target.request_timeout:.0f}s"
        return
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
        return
    rec.text = "".join(parts)
    if usage and usage.get("completion_tokens") is not None:
        rec.output_tokens = int(usage["completion_tokens"])
        rec.server_prompt_tokens = usage.get("prompt_tokens")
        rec.tokens_from = "usage"
    else:
        rec.tokens_from = "retokenized"  # filled in by check()


async def run_each(
    targets: Sequence[Target], prompts: Sequence[Prompt], concurrency: int, read_s: float = 600.0
) -> tuple[list[Record], float]:
    """Prompt i streamed to targets[i] (its own body), at most `concurrency` at once: the
    records, and the seconds from the first send to the last answer."""
    records = [Record(i, p.prompt_len, p.max_tokens) for i, p in enumerate(prompts)]
    gate = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(connect=10.0, read=read_s, write=30.0, pool=None)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(i: int) -> None:
            async with gate:
                await send(client, targets[i], prompts[i], records[i])

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        ends = [r.start + r.latency for r in records if r.latency is not None]
        return records, max(ends, default=start) - start


def check(records: Sequence[Record], tokenizer) -> None:
    """Decide success: a finish_reason, and exactly max_tokens tokens (or fewer with stop)."""
    for rec in records:
        if rec.error is not None:
            continue
        if rec.tokens_from == "retokenized":
            rec.output_tokens = len(tokenizer(rec.text, add_special_tokens=False).input_ids)
        if rec.finish_reason is None:
            rec.error = "stream ended without a finish_reason"
        elif rec.output_tokens > rec.max_tokens:
            rec.error = f"{rec.output_tokens} tokens, more than max_tokens={rec.max_tokens}"
        elif rec.output_tokens < rec.max_tokens and rec.finish_reason != "stop":
            rec.error = (
                f"{rec.output_tokens}/{rec.max_tokens} tokens with "
                f"finish_reason={rec.finish_reason!r}"
            )
        elif rec.output_tokens > 0 and rec.ttft is None:
            rec.error = "tokens counted but no text streamed"
        else:
            rec.ok = True


# -- a run -----------------------------------------------------------------------------------


async def _run(
    target: Target,
    prompts: Sequence[Prompt],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    progress: bool,
    desc: str,
    run_timeout: float | None,
) -> tuple[list[Record], float]:
    rng = random.Random(seed)
    records = [Record(i, p.prompt_len, p.max_tokens) for i, p in enumerate(prompts)]
    gate = asyncio.Semaphore(max_concurrency or len(prompts))
    conns = max_concurrency or len(prompts)
    timeout = httpx.Timeout(connect=10.0, read=target.read_timeout, write=30.0, pool=None)
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    bar = (
        tqdm(total=len(prompts), desc=desc, unit="req", leave=False) if progress and tqdm else None
    )

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(i: int) -> None:
            async with gate:
                await send(client, target, prompts[i], records[i])
            if bar:
                bar.update(1)

        tasks = []
        start = time.perf_counter()
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(one(i)))
            if request_rate != math.inf and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(request_rate))
        done, pending = await asyncio.wait(tasks, timeout=run_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for rec in records:
            if rec.latency is None and rec.error is None:
                rec.error = f"run timeout after {run_timeout}s"
        ends = [r.start + r.latency for r in records if r.latency is not None]
        duration = (max(ends) if ends else time.perf_counter()) - start
    if bar:
        bar.close()
    return records, duration


def _stats(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float) * scale
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def summarize(
    records: Sequence[Record],
    duration: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    good = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    in_tokens = sum(r.server_prompt_tokens or r.prompt_len for r in good)
    meets = [
        r
        for r in good
        if (slo_ttft_ms is None or (r.ttft or 0) * 1000 <= slo_ttft_ms)
        and (slo_tpot_ms is None or (r.tpot or 0) * 1000 <= slo_tpot_ms)
    ]
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            key = r.error.split(":")[0] if r.error.startswith("HTTP") else r.error[:80]
            errors[key] = errors.get(key, 0) + 1
    return {
        "num_requests": len(records),
        "completed": len(good),
        "failed": len(records) - len(good),
        "full_length": sum(r.ok and r.output_tokens == r.max_tokens for r in records),
        "stopped_early": sum(r.ok and r.output_tokens < r.max_tokens for r in records),
        "errors": errors,
        "tokens_from": sorted({r.tokens_from for r in good}),
        "duration_s": duration,
        "request_throughput": len(good) / duration if duration else 0.0,
        "output_tokens": out_tokens,
        "requested_output_tokens": sum(r.max_tokens for r in records),
        "prompt_tokens": in_tokens,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (out_tokens + in_tokens) / duration if duration else 0.0,
        "goodput": len(meets) / duration if duration else 0.0,
        "goodput_fraction": len(meets) / len(records) if records else 0.0,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "ttft_ms": _stats([r.ttft for r in good if r.ttft is not None]),
        "tpot_ms": _stats([t for r in good if (t := r.tpot) is not None]),
        "itl_ms": _stats([x for r in good for x in r.itls]),
        "e2el_ms": _stats([r.latency for r in good if r.latency is not None]),
        "chunks_per_token": (
            sum(len(r.chunk_times) for r in good) / out_tokens if out_tokens else None
        ),
    }


def run_benchmark(
    target: Target,
    prompts: Sequence[Prompt],
    tokenizer,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    progress: bool = True,
    desc: str = "requests",
    run_timeout: float | None = None,
) -> dict[str, Any]:
    """One run: returns {"summary", "requests"} (per-request records without text)."""
    records, duration = asyncio.run(
        _run(target, prompts, request_rate, max_concurrency, seed, progress, desc, run_timeout)
    )
    check(records, tokenizer)
    return {
        "summary": summarize(records, duration, slo_ttft_ms, slo_tpot_ms),
        "requests": [
            {
                **{k: v for k, v in asdict(r).items() if k not in ("text", "chunk_times", "start")},
                "tpot": r.tpot,
                "itls": [round(x, 6) for x in r.itls],
            }
            for r in records
        ],
    }


async def _probe(target: Target) -> None:
    """One tiny request so a server that loads lazily has done so before timing starts."""
    prompt = Prompt("Hello there, this is a warm-up request.", 0, 4)
    rec = Record(-1, 0, 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), trust_env=False) as client:
        await send(client, target, prompt, rec)
    if rec.error:
        raise RuntimeError(f"warm-up request failed: {rec.error}")


def measure(
    targets: Sequence[Target], prompts: Sequence[Prompt], concurrency: int, tokenizer: Any
) -> tuple[dict[str, Any], list[Record]]:
    """One checked run: its summary (with the 1-minute load average before and after) and
    its records."""
    load_before = os.getloadavg()[0]
    records, duration = asyncio.run(run_each(targets, prompts, concurrency))
    check(records, tokenizer)
    summary = summarize(records, duration)
    summary["loadavg_before"] = load_before
    summary["loadavg_after"] = os.getloadavg()[0]
    return summary, records


def interleaved(
    name: str,
    urls: dict[str, str],
    targets_of: Callable[[str, str, int], list[Target]],
    tokenizer: Any,
    concurrencies: Sequence[int],
) -> dict[str, dict[str, list[tuple[dict[str, Any], list[Record]]]]]:
    """Servers side by side on one workload per concurrency c (2 x c corpus prompts, median
    100 tokens, output 16..128): every server (label -> URL) in turn, then in reverse, so
    load from elsewhere falls on all alike. `targets_of(label, url, n)`: the n requests'
    targets. Per c and label, each repeat's (summary, records)."""
    runs: dict[str, dict[str, list[tuple[dict[str, Any], list[Record]]]]] = {}
    for c in concurrencies:
        prompts = synthetic_prompts(
            tokenizer, 2 * c, seed=c, median=100, sigma=0.5, max_len=400, out_min=16,
            out_max=128,
        )  # fmt: skip
        order = list(urls)
        runs[str(c)] = {label: [] for label in order}
        for labels in (order, order[::-1]):
            for label in labels:
                targets = targets_of(label, urls[label], len(prompts))
                summary, records = measure(targets, prompts, c, tokenizer)
                runs[str(c)][label].append((summary, records))
                print(
                    f"{name} c={c} {label}: {summary['output_throughput']:.1f} tok/s, "
                    f"{summary['failed']} failed, load {summary['loadavg_after']:.2f}",
                    flush=True,
                )
    return runs


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine(uptime_start: str) -> dict[str, Any]:
    """The machine a benchmark ran on: CPU, cores, `uptime` at its start and now."""
    from bench.grammar_engines import cpu_model

    return {
        "cpu": cpu_model(),
        "num_cpus": os.cpu_count(),
        "uptime_start": uptime_start,
        "uptime_end": uptime(),
    }


def save_results(stem: str, result: dict[str, Any], markdown: str) -> None:
    """bench/results/<stem>.json and <stem>.md; prints the markdown."""
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown)
    print(markdown)


def warmup(target: Target, n: int = 1) -> None:
    for _ in range(n):
        asyncio.run(_probe(target))


# -- plots -----------------------------------------------------------------------------------


def plot_cdfs(runs: dict[str, dict[str, Any]], path: Path, title: str = "") -> None:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) of several runs, one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, name) in zip(
        axes.flat,
        [("ttft", "TTFT"), ("tpot", "TPOT"), ("itls", "ITL"), ("latency", "end-to-end latency")],
        strict=True,
    ):
        for label, run in runs.items():
            reqs = [r for r in run["requests"] if r["ok"]]
            if key == "itls":
                vals = run.get("itl_samples") or [x for r in reqs for x in r["itls"]]
            else:
                vals = [r[key] for r in reqs if r[key] is not None]
            if not vals:
                continue
            v = np.sort(np.asarray(vals) * 1000)
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms, log)")
        ax.set_ylabel("fraction of requests" if key != "itls" else "fraction of gaps")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(series: dict[str, dict[int, dict[str, Any]]], path: Path, title: str = "") -> None:
    """Output tokens/s and TTFT p50/p99 against max concurrency; series[label][c] = summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, by_c in series.items():
        cs = sorted(by_c)
        a1.plot(cs, [by_c[c]["output_throughput"] for c in cs], marker="o", label=label)
        line = a2.plot(
            cs, [by_c[c]["ttft_ms"]["p99"] or np.nan for c in cs], marker="o", label=f"{label} p99"
        )
        a2.plot(
            cs,
            [by_c[c]["ttft_ms"]["p50"] or np.nan for c in cs],
            marker=".",
            ls="--",
            color=line[0].get_color(),
            label=f"{label} p50",
        )
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max concurrency")
        ax.grid(True, which="both", alpha=0.3)
    a1.set_ylabel("output tokens/s")
    a2.set_ylabel("TTFT (ms, log)")
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    a2.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------


def format_summary(s: dict[str, Any]) -> str:
    def row(name: str, st: dict[str, Any]) -> str:
        if st["mean"] is None:
            return f"  {name:<6} -"
        return (
            f"  {name:<6} mean {st['mean']:9.1f}  p50 {st['p50']:9.1f}  p90 {st['p90']:9.1f}"
            f"  p99 {st['p99']:9.1f}  ms"
        )

    lines = [
        f"  requests {s['completed']}/{s['num_requests']} ok ({s['failed']} failed, "
        f"{s['full_length']} full length, {s['stopped_early']} stopped early)  "
        f"in {s['duration_s']:.1f}s",
        f"  {s['request_throughput']:.2f} req/s  {s['output_throughput']:.1f} output tok/s  "
        f"{s['total_token_throughput']:.1f} total tok/s  goodput {s['goodput']:.2f} req/s",
        row("TTFT", s["ttft_ms"]),
        row("TPOT", s["tpot_ms"]),
        row("ITL", s["itl_ms"]),
        row("E2EL", s["e2el_ms"]),
    ]
    if s["errors"]:
        lines.append(f"  errors: {s['errors']}")
    return "\n".join(lines)


def _ints(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    return [None if t in ("0", "inf", "none") else int(t) for t in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name sent in requests (omit: none)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder/id (default: --model)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", default="100", help="int, or a comma list per concurrency")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson req/s; inf")
    p.add_argument("--max-concurrency", default=None, help="int or comma list (a sweep)")
    p.add_argument("--prompts-jsonl", default=None, help='lines of {"prompt", "max_tokens"?}')
    p.add_argument("--prompt-len-median", type=float, default=100)
    p.add_argument("--prompt-len-sigma", type=float, default=1.0)
    p.add_argument("--prompt-len-min", type=int, default=8)
    p.add_argument("--prompt-len-max", type=int, default=1000)
    p.add_argument("--output-len-min", type=int, default=16)
    p.add_argument("--output-len-max", type=int, default=256)
    p.add_argument("--output-len-dist", choices=["uniform", "loguniform"], default="uniform")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos (turn off for servers that reject the field)",
    )
    p.add_argument("--include-usage", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--read-timeout", type=float, default=120.0)
    p.add_argument("--run-timeout", type=float, default=3600.0)
    p.add_argument("--warmup", type=int, default=1, help="warm-up requests before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="server")
    p.add_argument("--out", default="bench/results/serve_run", help="prefix of .json/.png")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    tok_path = args.tokenizer or args.model
    if tok_path is None:
        raise SystemExit("give --tokenizer (or --model naming a tokenizer)")
    tokenizer = load_tokenizer(tok_path)
    levels = _ints(args.max_concurrency)
    counts = [int(n) for n in args.num_prompts.split(",")]
    if len(counts) == 1:
        counts *= len(levels)
    if len(counts) != len(levels):
        raise SystemExit("--num-prompts: one value or one per concurrency level")
    target = Target(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        include_usage=args.include_usage,
        extra_body=json.loads(args.extra_body),
        request_timeout=args.request_timeout,
        read_timeout=args.read_timeout,
    )
    if args.warmup:
        warmup(target, args.warmup)
    runs: dict[str, dict[str, Any]] = {}
    series: dict[int, dict[str, Any]] = {}
    for level, n in zip(levels, counts, strict=True):
        if args.prompts_jsonl:
            prompts = jsonl_prompts(args.prompts_jsonl, tokenizer, n, args.output_len_max)
        else:
            prompts = synthetic_prompts(
                tokenizer,
                n,
                args.seed,
                args.prompt_len_median,
                args.prompt_len_sigma,
                args.prompt_len_min,
                args.prompt_len_max,
                args.output_len_min,
                args.output_len_max,
                args.output_len_dist,
            )
        name = f"c={level or 'inf'}"
        load = os.getloadavg()
        run = run_benchmark(
            target,
            prompts,
            tokenizer,
            args.request_rate,
            level,
            args.seed,
            args.slo_ttft_ms,
            args.slo_tpot_ms,
            not args.no_progress,
            f"{args.label} {name}",
            args.run_timeout,
        )
        run["config"] = {
            "max_concurrency": level,
            "num_prompts": n,
            "loadavg_start": load,
            "loadavg_end": os.getloadavg(),
        }
        runs[name] = run
        series[level or n] = run["summary"]
        print(f"{args.label} {name} (load avg {load[0]:.2f}):")
        print(format_summary(run["summary"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {name: {k: v for k, v in r.items() if k != "requests"} for name, r in runs.items()}
    result = {"args": vars(args), "runs": summary}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    raw = out.parent / "raw" / f"{out.name}.requests.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps({name: run["requests"] for name, run in runs.items()}) + "\n")
    plot_cdfs(runs, out.with_name(out.name + "_cdf.png"), f"{args.label}: latency CDFs")
    if len(runs) > 1:
        plot_sweep({args.label: series}, out.with_name(out.name + "_sweep.png"), args.label)
    print(f"wrote {out.with_suffix('.json')}, plots and {raw}")


if __name__ == "__main__":
    main()
