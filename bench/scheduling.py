"""Scheduler v2 (issue 14): every target as a ratio of runs side by side in one invocation.

Systems: `base` (packserve at commit 96d2be1, from a git worktree, default /tmp/packserve-base,
created if missing), `new` (this tree), optional `new-fcfs` (this tree with --scheduling-policy
fcfs) and `transformers-cb` (`transformers serve --continuous-batching`, started as
bench/compare_servers.py starts it). Model: SmolLM2-135M-Instruct fp32. Every packserve server
is started through a `python -c` stub that prints `packserve.__file__` into its log before
`cli.main()`, and the run stops if a system imported the other tree's package.

Sections (prompts cut from the corpus with bench/serve.py's `synthetic_prompts`):
  A  fresh/repeat: 96 streamed prompts (lognormal lengths, median 50, <= 650 tokens;
     max_tokens uniform 16..128; greedy, EOS ignored) at c=64 and c=16. Per system and level a
     fresh server runs the set twice: `fresh`, then `repeat` (served before).
  B  stall: 32 streams decoding (max_tokens 256); once each has 8 tokens, one 3000-token prompt
     arrives. Gaps between consecutive tokens of the streams that overlap its prefill (its
     arrival to its first token), longest vs the streams' median gap before it arrived.
  C  shared prefix, `new` with and without --no-enable-prefix-caching: (i) completions sharing
     a 1000-token prefix, 32 requests at c=8 after one priming request; (ii) 6 concurrent
     8-turn chats resending their history. TTFT and usage.prompt_tokens_details.cached_tokens.
  D  budget: `new` per --max-num-batched-tokens: A at c=64 (fresh) and B, each on a fresh server.

    .venv/bin/python -m bench.scheduling --systems base,new,transformers-cb   # everything
    .venv/bin/python -m bench.scheduling --sections B,D --budgets 256,512      # a part
    .venv/bin/python -m bench.scheduling --quick --systems base,new           # smoke test

Writes bench/results/scheduling.{json,md} and scheduling.budgets.png (--quick:
scheduling.quick.*); per-request records go to bench/results/raw/ (git ignores it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench import compare_servers, serve
from bench.compare_servers import CpuMeter, fmt
from packserve.server.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NAME = "smollm2"  # --served-model-name of the packserve servers
SYSTEM_FLAGS = {
    "base": (),
    "new": (),
    "new-fcfs": ("--scheduling-policy", "fcfs"),
    "new-thread": ("--no-engine-process",),  # the engine loop in the server's process
}
SYSTEMS = (*SYSTEM_FLAGS, "transformers-cb")
# Says where packserve came from, then runs the CLI as `python -m packserve.server.cli` does.
STUB = (
    "import packserve; print('packserve imported from', packserve.__file__, flush=True); "
    "from packserve.server.cli import main; main()"
)


@dataclass(frozen=True, slots=True)
class Sizes:
    """Workload sizes: the issue's (FULL) or a smoke test's (QUICK)."""

    num_prompts: int = 96  # workload A
    levels: tuple[int, ...] = (64, 16)  # A's max concurrency; the first is also D's
    prompt_median: float = 50
    prompt_sigma: float = 1.0
    prompt_max: int = 650
    out_tokens: tuple[int, int] = (16, 128)  # max_tokens uniform in this range
    stall_streams: int = 32  # workload B
    stall_max_tokens: int = 256  # enough to decode through the whole prefill window
    stall_warm_tokens: int = 8  # tokens every stream has when the long prompt is sent
    long_prompt: int = 3000
    prefix_len: int = 1000  # workload C(i)
    prefix_requests: int = 32
    prefix_concurrency: int = 8
    chats: int = 6  # workload C(ii)
    turns: int = 8
    chat_opening: int = 200  # tokens of a chat's first user message
    chat_user: int = 40  # median tokens of a later user message
    reply_tokens: int = 32  # max_tokens of C's requests (EOS ignored)
    budgets: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # D


FULL = Sizes()
QUICK = Sizes(
    num_prompts=8,
    levels=(4,),
    prompt_max=200,
    out_tokens=(4, 16),
    stall_streams=4,
    stall_max_tokens=96,
    stall_warm_tokens=4,
    long_prompt=600,
    prefix_len=300,
    prefix_requests=6,
    prefix_concurrency=3,
    chats=2,
    turns=3,
    chat_opening=60,
    chat_user=20,
    reply_tokens=8,
    budgets=(128, 512),
)


@dataclass(frozen=True, slots=True)
class Setup:
    """Where the systems come from and how their servers are started."""

    model_dir: str
    base_dir: Path  # the baseline's worktree
    new_dir: Path  # the tree `new*` run from (this one unless --new-dir)
    new_flags: tuple[str, ...]  # added to every `new*` server's flags
    log_dir: Path
    cb_args: argparse.Namespace  # what compare_servers.Server reads for transformers-cb
    timeout_s: float  # a whole run, and one request


@dataclass(frozen=True, slots=True)
class Server:
    """A started, warmed-up server and what the results record about it."""

    target: serve.Target
    pid: int
    info: dict[str, Any]  # flags, startup_s, log, imported_from


# -- servers -----------------------------------------------------------------------------------


def git(*args: str, cwd: Path = ROOT) -> str:
    run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return run.stdout.strip()


def base_checkout(path: Path, rev: str) -> dict[str, str]:
    """The baseline worktree at `rev` (added if missing); refuses one at another commit."""
    if not path.exists():
        git("worktree", "add", "--detach", str(path), rev)
    head, want = git("rev-parse", "HEAD", cwd=path), git("rev-parse", f"{rev}^{{commit}}")
    if head != want:
        raise SystemExit(f"{path} is at {head}, not {rev} ({want})")
    return {"dir": str(path), "rev": head, "dirty": git("status", "--porcelain", cwd=path)}


@contextlib.contextmanager
def serving(setup: Setup, system: str, flags: Sequence[str] = ()) -> Iterator[Server]:
    """A fresh, ready, warmed-up server of `system`; stopped on exit. A packserve server
    must import packserve from its own tree (checked in the first line of its log)."""
    t0 = time.monotonic()
    if system == "transformers-cb":
        cb = compare_servers.Server(system, setup.model_dir, NAME, setup.cb_args, setup.log_dir)
        try:
            cb.wait_ready()
            info = {"startup_s": round(time.monotonic() - t0, 1), "log": str(cb.log)}
            serve.warmup(cb.target, 2)
            yield Server(cb.target, cb.pid, info)
        finally:
            cb.stop()
        return
    tree = setup.base_dir if system == "base" else setup.new_dir
    flags = (*SYSTEM_FLAGS[system], *(() if system == "base" else setup.new_flags), *flags)
    argv = ["--model", setup.model_dir, "--served-model-name", NAME]
    fd, log = tempfile.mkstemp(prefix=f"{system}-", suffix=".log", dir=setup.log_dir)
    os.close(fd)
    proc = ServerProcess(
        [*argv, "--max-queued-requests", "1024", *flags],
        command=(sys.executable, "-c", STUB, "serve"),
        env={"PYTHONPATH": str(tree)},
        cwd=tree,
        log_path=log,
        new_session=True,
        ready_timeout=300,
    )
    try:
        proc.start()
        assert proc.proc is not None
        said = [x for x in proc.logs(tail=None).splitlines() if x.startswith("packserve imp")]
        imported = said[0].split(" from ")[-1] if said else "?"
        if not imported.startswith(f"{tree}/"):
            raise RuntimeError(f"{system} imported packserve from {imported}, not {tree}")
        info = {"flags": list(flags), "startup_s": round(time.monotonic() - t0, 1), "log": log}
        target = serve.Target(proc.url, NAME)
        target = replace(target, request_timeout=setup.timeout_s, read_timeout=setup.timeout_s)
        serve.warmup(target, 2)
        yield Server(target, proc.proc.pid, info | {"imported_from": imported})
    finally:
        proc.stop()


Job = tuple[dict[str, Any], str, tuple[str, ...], Callable[[Server], Iterator[dict[str, Any]]]]


def run_jobs(section: str, setup: Setup, jobs: list[Job]) -> list[dict[str, Any]]:
    """Each job (key, system, flags, body) on a fresh server: every entry its body yields is
    one result, under its key; a failure is recorded as the key with an error, not raised."""
    runs: list[dict[str, Any]] = []
    for key, system, flags, body in jobs:
        label = f"  {section} " + " ".join(f"{k}={v}" for k, v in key.items())
        try:
            with serving(setup, system, flags) as server:
                for entry in body(server):
                    runs.append(key | server.info | entry)
                    print(f"{label}: {describe(runs[-1])}", flush=True)
        except Exception as exc:  # a broken system is reported, not fatal
            runs.append(key | {"error": repr(exc)})
            print(f"{label} FAILED: {exc!r}"[:3000], flush=True)
    return runs


def describe(entry: dict[str, Any]) -> str:
    """One result as the report's table cells, `column: value`."""
    if "summary" in entry:
        head, cells = LOAD_HEAD, load_cells(entry)
    elif "stall_ratio" in entry:
        head, cells = STALL_HEAD, stall_cells(entry)
    else:
        return "; ".join(", ".join(map(str, row[1:])) for row in c_cells(entry)[:2])
    return ", ".join(f"{h}: {c}" for h, c in zip(head.split(" | "), cells, strict=True))


# -- A: a prompt set through the load generator ------------------------------------------------

KEPT = ("completed", "failed", "errors", "duration_s", "output_tokens", "output_throughput")
LATENCIES = ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms")


def load_run(server: Server, prompts: list[serve.Prompt], tok: Any, level: int) -> dict:
    """One pass of `prompts` at max concurrency `level`: the summary (and the raw records)."""
    meter, load = CpuMeter([server.pid]), os.getloadavg()[0]
    meter.start()
    run = serve.run_benchmark(server.target, prompts, tok, max_concurrency=level, progress=False)
    summary = {k: run["summary"][k] for k in (*KEPT, *LATENCIES)}
    return {"summary": summary, "cpu": meter.stop(), "loadavg_1m": load, "raw": run["requests"]}


def a_jobs(
    systems: list[str], levels: Sequence[int], prompts: list[serve.Prompt], tok
) -> list[Job]:
    """Per level, each system (order rotated per level) on a fresh server: fresh, then repeat."""
    jobs: list[Job] = []
    for i, level in enumerate(levels):
        for system in systems[i % len(systems) :] + systems[: i % len(systems)]:

            def body(server: Server, level: int = level) -> Iterator[dict[str, Any]]:
                for phase in ("fresh", "repeat"):
                    yield {"phase": phase} | load_run(server, prompts, tok, level)

            jobs.append(({"system": system, "level": level}, system, (), body))
    return jobs


# -- B: a long prompt arrives into running streams ---------------------------------------------


def stall_metrics(times: Sequence[Sequence[float]], arrival: float, first: float) -> dict:
    """Token gaps of running streams (`times`: each stream's token arrival times) around a
    prompt sent at `arrival` that got its first token at `first` (same clock). Reference: the
    gaps after every stream had started and before the arrival. Window: the gaps overlapping
    (arrival, first), so that a stall over the whole prefill counts as one gap."""
    ready = max(t[0] for t in times if t)
    before, window = [], []
    for t in times:
        for a, b in zip(t, t[1:], strict=False):
            if a >= ready and b <= arrival:
                before.append(b - a)
            elif b > arrival and a < first:
                window.append(b - a)
    median = statistics.median(before) if before else None
    longest = max(window) if window else None
    return {
        "prefill_window_ms": (first - arrival) * 1000,
        "median_gap_ms": median * 1000 if median else None,
        "longest_gap_ms": longest * 1000 if longest else None,
        "window_median_gap_ms": statistics.median(window) * 1000 if window else None,
        "stall_ratio": longest / median if longest and median else None,
        "num_reference_gaps": len(before),
        "streams_through_window": sum(1 for t in times if t and t[-1] >= first),
        "num_streams": len(times),
    }


async def _stall(target: serve.Target, streams: list[serve.Prompt], long: serve.Prompt, warm: int):
    recs = [serve.Record(i, p.prompt_len, p.max_tokens) for i, p in enumerate(streams)]
    long_rec = serve.Record(-1, long.prompt_len, long.max_tokens)
    limits = httpx.Limits(max_connections=len(streams) + 1)
    timeout = httpx.Timeout(target.read_timeout, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        tasks = [
            asyncio.create_task(serve.send(client, target, *pr))
            for pr in zip(streams, recs, strict=True)
        ]
        while min(len(r.chunk_times) for r in recs) < warm and not all(t.done() for t in tasks):
            await asyncio.sleep(0.005)
        await serve.send(client, target, long, long_rec)
        await asyncio.gather(*tasks)
    return recs, long_rec


def stall_run(server: Server, streams: list[serve.Prompt], long: serve.Prompt, warm: int) -> dict:
    """Streams decoding, then the long prompt: `stall_metrics` of the streams around it."""
    target = replace(server.target, ignore_eos=True)
    recs, long_rec = asyncio.run(_stall(target, streams, long, warm))
    errors = [r.error for r in (*recs, long_rec) if r.error]
    if errors or long_rec.ttft is None:
        raise RuntimeError(f"stall run failed: {errors[:3] or 'no first token'}")
    times = [[r.start + t for t in r.chunk_times] for r in recs]
    out = stall_metrics(times, long_rec.start, long_rec.start + long_rec.ttft)
    # valid: every stream decoded through the whole window, and had gaps before it
    valid = out["streams_through_window"] == len(recs) and out["num_reference_gaps"] > 0
    return out | {"long_prompt_tokens": long.prompt_len, "valid": valid}


def b_jobs(systems: list[str], stall: tuple) -> list[Job]:
    """The stall run, each packserve system on a fresh server."""
    return [
        ({"system": x}, x, (), lambda server: iter([stall_run(server, *stall)]))
        for x in systems
        if x in SYSTEM_FLAGS
    ]


# -- C: shared prefixes --------------------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    """One streamed request as C needs it: its first token's time and its usage."""

    ttft: float | None = None  # seconds from sending to the first content
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)  # the stream's usage chunk
    error: str | None = None

    @property
    def cached_tokens(self) -> int | None:
        return (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens")


async def stream_reply(client: httpx.AsyncClient, target: serve.Target, body: dict) -> Reply:
    """POST a streamed completion (`prompt` in `body`) or chat (`messages`), greedy, EOS
    ignored, usage included; never raises (errors land in Reply.error)."""
    chat = "messages" in body
    url = target.base_url + ("/v1/chat/completions" if chat else "/v1/completions")
    body = body | {"model": target.model, "stream": True, "temperature": 0, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True}
    reply, parts, sent = Reply(), [], time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                reply.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return reply
            async for line in resp.aiter_lines():
                data = line[5:].strip()
                if not line.startswith("data:") or data == "[DONE]":
                    continue
                event = json.loads(data)
                reply.usage = event.get("usage") or reply.usage
                text = "".join(serve._content(c, chat) for c in event.get("choices") or ())
                if text and reply.ttft is None:
                    reply.ttft = time.perf_counter() - sent
                parts.append(text)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"[:300]
    reply.text = "".join(parts)
    return reply


def reply_stats(replies: Sequence[Reply]) -> dict[str, Any]:
    ok = [r for r in replies if r.error is None and r.ttft is not None]
    mean = statistics.fmean
    return {
        "requests": len(replies),
        "failed": len(replies) - len(ok),
        "errors": sorted({r.error for r in replies if r.error})[:3],
        "ttft_ms": serve._stats([r.ttft for r in ok if r.ttft is not None]),
        "prompt_tokens_mean": mean(r.usage.get("prompt_tokens", 0) for r in ok) if ok else None,
        "cached_tokens_mean": mean(r.cached_tokens or 0 for r in ok) if ok else None,
        "cached_tokens_reported": sum(r.cached_tokens is not None for r in ok),
    }


async def _prefix(target: serve.Target, prompts: list[str], conc: int, n: int) -> list[Reply]:
    gate = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(timeout=target.read_timeout, trust_env=False) as client:

        async def one(prompt: str) -> Reply:
            async with gate:
                return await stream_reply(client, target, {"prompt": prompt, "max_tokens": n})

        await one(prompts[0])  # priming, untimed: the shared prefix computed once
        return list(await asyncio.gather(*(one(p) for p in prompts[1:])))


async def _chats(target: serve.Target, chats: list[list[str]], n: int) -> list[list[Reply]]:
    async with httpx.AsyncClient(timeout=target.read_timeout, trust_env=False) as client:

        async def chat(users: list[str]) -> list[Reply]:
            messages: list[dict[str, str]] = []
            replies = []
            for user in users:
                messages.append({"role": "user", "content": user})
                body = {"messages": messages, "max_tokens": n}
                replies.append(await stream_reply(client, target, body))
                messages.append({"role": "assistant", "content": replies[-1].text})
            return replies

        return list(await asyncio.gather(*(chat(users) for users in chats)))


def c_jobs(sizes: Sizes, prefixed: list[str], chats: list[list[str]]) -> list[Job]:
    """`new` with prefix caching on, then off: C(i), then C(ii) on the same server."""

    def body(server: Server) -> Iterator[dict[str, Any]]:
        n = sizes.reply_tokens
        shared = asyncio.run(_prefix(server.target, prefixed, sizes.prefix_concurrency, n))
        by_chat = asyncio.run(_chats(server.target, chats, n))
        turns = [reply_stats([c[t] for c in by_chat]) for t in range(sizes.turns)]
        later = reply_stats([r for c in by_chat for r in c[1:]])
        yield {"prefix": reply_stats(shared), "chat": later, "chat_turns": turns}

    off = ("--no-enable-prefix-caching",)
    return [({"caching": "on"}, "new", (), body), ({"caching": "off"}, "new", off, body)]


# -- D: the step budget ----------------------------------------------------------------------


def d_jobs(flag: str, budgets: Sequence[int], level: int, prompts, tok, stall) -> list[Job]:
    """Per value of the budget `flag`, `new` on a fresh server for A (fresh) and another for B."""
    jobs: list[Job] = []
    for budget in budgets:
        flags = (flag, str(budget))
        a_key, b_key = {"budget": budget, "workload": "A"}, {"budget": budget, "workload": "B"}
        jobs.append((a_key, "new", flags, lambda s: iter([load_run(s, prompts, tok, level)])))
        jobs.append((b_key, "new", flags, lambda s: iter([stall_run(s, *stall)])))
    return jobs


# -- verdicts and report -----------------------------------------------------------------------

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def verdict(target: str, num: float | None, den: float | None, op: str, bound: float) -> dict:
    """{target, value, met}: num/den against `bound`; value and met None when a side is missing."""
    value = num / den if num is not None and den else None
    met = None if value is None else OPS[op](float(value), float(bound))
    return {"target": f"{target} {op} {bound:g}", "value": value, "met": met}


def verdicts(sections: dict[str, Any], levels: Sequence[int]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios of this invocation's runs."""
    rows = []
    a_runs = {(r["system"], r["level"], r["phase"]): r["summary"] for r in ok(sections, "A")}

    def a(system: str, level: int, phase: str, key: str, q: str) -> float | None:
        s = a_runs.get((system, level, phase))
        return None if s is None else s[key] if key == "output_throughput" else s[key][q]

    if "A" in sections:
        top = levels[0]
        for other, op, bound in (("base", "<=", 0.5), ("transformers-cb", "<", 1.0)):
            num, den = (a(x, top, "fresh", "ttft_ms", "p50") for x in ("new", other))
            rows.append(verdict(f"A: TTFT p50 new/{other}, c={top} fresh", num, den, op, bound))
        for level in levels:
            for name, key, q, op in (
                ("TTFT p99", "ttft_ms", "p99", "<="),
                ("out tok/s", "output_throughput", "", ">="),
            ):
                num, den = (a(x, level, "fresh", key, q) for x in ("new", "base"))
                rows.append(verdict(f"A: {name} new/base, c={level} fresh", num, den, op, 1.0))
            num, den = (a("new", level, x, "ttft_ms", "p99") for x in ("repeat", "fresh"))
            rows.append(verdict(f"A: TTFT p99 repeat/fresh, new, c={level}", num, den, "<=", 0.2))
    for r in ok(sections, "B"):
        if r["system"] != "base":
            name = f"B: longest gap / median gap, {r['system']}"
            rows.append(verdict(name, r["longest_gap_ms"], r["median_gap_ms"], "<=", 3))
    c = {r["caching"]: r for r in ok(sections, "C")}
    for part, key in (("shared prefix", "prefix"), ("chat turns > 1", "chat")):
        if "on" in c and "off" in c:
            num, den = (c[x][key]["ttft_ms"]["p50"] for x in ("on", "off"))
            rows.append(verdict(f"C: TTFT p50 caching on/off, {part}", num, den, "<=", 0.2))
        if "on" in c:
            s = c["on"][key]
            name = f"C: cached / prompt tokens, {part}"
            rows.append(verdict(name, s["cached_tokens_mean"], s["prompt_tokens_mean"], ">", 0))
    return rows


def ok(sections: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in sections.get(name, {}).get("runs", []) if "error" not in r]


def secs(ms: float | None) -> str:
    return fmt(None if ms is None else ms / 1000, 2)


def table(head: str, rows: list[list[Any]]) -> list[str]:
    cols = head.count("|") + 1
    out = [f"| {head} |", "|---" + "|--:" * (cols - 1) + "|"]
    return (
        out + ["| " + " | ".join(map(str, r + [""] * (cols - len(r)))) + " |" for r in rows] + [""]
    )


def load_cells(r: dict[str, Any]) -> list[Any]:
    s = r["summary"]
    lat = [secs(s["ttft_ms"]["p50"]), secs(s["ttft_ms"]["p99"]), secs(s["itl_ms"]["p99"])]
    return [f"{s['output_throughput']:.1f}", *lat, s["failed"], f"{r['cpu']['others']:.2f}"]


def stall_cells(r: dict[str, Any]) -> list[Any]:
    return [
        secs(r["prefill_window_ms"]),
        fmt(r["median_gap_ms"]),
        fmt(r["longest_gap_ms"]),
        fmt(r["stall_ratio"], 2),
        fmt(r["window_median_gap_ms"]),
        f"{r['streams_through_window']}/{r['num_streams']}",
        "yes" if r["valid"] else "**no**",
    ]


def rows_of(runs: list[dict[str, Any]], keys: Sequence[str], cells) -> list[list[Any]]:
    """Table rows: the run's key values, then its cells (or its error)."""
    return [
        [r.get(k, "") for k in keys]
        + ([f"error: {r['error'][:150]}"] if "error" in r else cells(r))
        for r in runs
    ]


def c_cells(r: dict[str, Any]) -> list[list[Any]]:
    """Section C's rows of one server: the shared prefix, later chat turns, each chat turn."""
    parts = [("shared prefix", r["prefix"]), ("chat turns > 1", r["chat"])]
    parts += [(f"chat turn {i + 1}", t) for i, t in enumerate(r["chat_turns"])]
    return [
        [r["caching"], part, secs(s["ttft_ms"]["p50"]), secs(s["ttft_ms"]["p99"])]
        + [fmt(s["prompt_tokens_mean"]), fmt(s["cached_tokens_mean"])]
        + [f"{s['cached_tokens_reported']}/{s['requests'] - s['failed']}", s["failed"]]
        for part, s in parts
    ]


LOAD_HEAD = "out tok/s | TTFT p50 s | TTFT p99 s | ITL p99 s | failed | others' CPU"
STALL_HEAD = (
    "prefill window s | median gap ms | longest gap ms | ratio | median gap in window ms | "
    "streams through | valid"
)
C_HEAD = (
    "caching | workload | TTFT p50 s | TTFT p99 s | prompt tokens | cached tokens | "
    "responses with cached_tokens | failed"
)
TITLES = {
    "A": "A. Fresh prompts, then the same prompts again (served before)",
    "B": "B. A long prompt arrives into running streams: token gaps",
    "C": "C. Shared prefixes, `new` with prefix caching on and off",
    "D": "D. Step budget (--max-num-batched-tokens), `new`: workload A, then B",
}


def markdown(result: dict[str, Any]) -> str:
    m, g = result["machine"], result["git"]
    lines = [
        "# Scheduler v2 (issue 14): the targets side by side",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; {m['date']}. This tree "
        f"{g['head'][:10]} ({len(g['engine_files_modified'])} packserve/ files modified), "
        f"base {result['base'].get('rev', '-')[:10]}. Load average at start "
        f"{result['quiet_check']['loadavg_1m']:.2f}. `{result['command']}`; sizes in the JSON.",
        "",
    ]
    for name, sec in result["sections"].items():
        lines += [f"## {TITLES[name]} ({sec['wall_s'] / 60:.1f} min)", ""]
        runs = sec["runs"]
        if name == "A":
            lines += table(
                f"system | c | run | {LOAD_HEAD}",
                rows_of(runs, ("system", "level", "phase"), load_cells),
            )
        elif name == "B":
            lines += table(f"system | {STALL_HEAD}", rows_of(runs, ("system",), stall_cells))
        elif name == "C":
            rows = [
                row
                for r in runs
                for row in (rows_of([r], ("caching",), None) if "error" in r else c_cells(r))
            ]
            lines += table(C_HEAD, rows)
        else:
            for w, head, cells in (("A", LOAD_HEAD, load_cells), ("B", STALL_HEAD, stall_cells)):
                part = [r for r in runs if r["workload"] == w]
                lines += table(f"budget | {head}", rows_of(part, ("budget",), cells))
    met = {True: "yes", False: "**no**", None: "n/a"}
    rows = [[v["target"], fmt(v["value"], 3), met[v["met"]]] for v in result["verdicts"]]
    return "\n".join(lines + ["## Targets", "", *table("target | value | met", rows)])


def plot_budgets(runs: list[dict[str, Any]], path: Path) -> bool:
    """Output tok/s, TTFT and the stall ratio against the budget (section D)."""
    a = {r["budget"]: r["summary"] for r in runs if "summary" in r}
    b = {r["budget"]: r["stall_ratio"] for r in runs if r.get("stall_ratio")}
    if len(a) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    xs = sorted(a)
    axes[0].plot(xs, [a[x]["output_throughput"] for x in xs], marker="o")
    axes[0].set_ylabel("output tok/s (A)")
    for q in ("p50", "p99"):
        axes[1].plot(xs, [a[x]["ttft_ms"][q] / 1000 for x in xs], marker="o", label=f"TTFT {q}")
    axes[1].set_ylabel("s (A)")
    axes[1].legend()
    axes[2].plot(sorted(b), [b[x] for x in sorted(b)], marker="o")
    axes[2].axhline(3, ls="--", color="gray")
    axes[2].set_ylabel("longest gap / median gap (B)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("--max-num-batched-tokens")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- main ------------------------------------------------------------------------------------


def cut(
    tok: Any, n: int, seed: int, median: float, sigma: float, hi: int, out: int = 1, top: int = 0
):
    """`n` corpus prompts, lognormal token lengths (median, sigma) clipped to 8..hi;
    max_tokens `out` (uniform in out..top when top is given)."""
    return serve.synthetic_prompts(tok, n, seed, median, sigma, min(8, hi), hi, out, top or out)


def ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default="A,B,C,D", help="any of A,B,C,D")
    p.add_argument("--systems", default="base,new", help=f"A's and B's, of {','.join(SYSTEMS)}")
    p.add_argument("--budgets", default=None, help="D's values of --budget-flag")
    p.add_argument(
        "--budget-flag",
        default="--max-num-batched-tokens",
        help="the budget D sweeps (or --max-prefill-tokens-while-decoding)",
    )
    p.add_argument("--levels", default=None, help="A's max concurrency levels (the first: D's)")
    p.add_argument("--num-prompts", type=int, default=None, help="A's prompts (default 96)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument("--new-flags", default="", help="extra `packserve serve` flags for new*")
    p.add_argument("--new-dir", type=Path, default=ROOT, help="the tree new* run from")
    p.add_argument("--base-rev", default="96d2be1")
    p.add_argument("--base-dir", type=Path, default=Path("/tmp/packserve-base"))
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--cb-num-blocks", type=int, default=1024)  # as compare_servers
    p.add_argument("--cb-block-size", type=int, default=32)
    p.add_argument("--cb-max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-load", type=float, default=1.5, help="wait for this load avg first")
    p.add_argument("--max-wait-min", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=None, help="path prefix of .json/.md")
    args = p.parse_args()
    s = QUICK if args.quick else FULL
    s = replace(
        s,
        num_prompts=args.num_prompts or s.num_prompts,
        levels=ints(args.levels) or s.levels,
        budgets=ints(args.budgets) or s.budgets,
    )
    sections = [x.strip().upper() for x in args.sections.split(",")]
    systems = [x for x in args.systems.split(",") if x]
    if unknown := (set(systems) - set(SYSTEMS)) | (set(sections) - set("ABCD")):
        raise SystemExit(f"unknown systems or sections: {sorted(unknown)}")

    import torch
    import transformers

    from bench.prefill import cpu_model
    from packserve.models.smollm2 import default_model_dir

    out = args.out or RESULTS / ("scheduling.quick" if args.quick else "scheduling")
    model_dir = args.model or str(default_model_dir())
    tok = serve.load_tokenizer(model_dir)
    log_dir = Path(tempfile.mkdtemp(prefix="scheduling_"))
    print(f"server logs: {log_dir}", flush=True)
    base = base_checkout(args.base_dir.resolve(), args.base_rev) if "base" in systems else {}
    args.request_timeout = args.timeout  # compare_servers.Server reads it
    new_flags = tuple(args.new_flags.split())
    dirs = (args.base_dir.resolve(), args.new_dir.resolve())
    setup = Setup(model_dir, *dirs, new_flags, log_dir, args, args.timeout)

    seed = args.seed
    set_a = cut(
        tok, s.num_prompts, seed, s.prompt_median, s.prompt_sigma, s.prompt_max, *s.out_tokens
    )
    streams = cut(tok, s.stall_streams, seed + 1, 50, 0.5, 200, s.stall_max_tokens)
    (long,) = cut(tok, 1, seed + 2, s.long_prompt, 0, s.long_prompt, 8)
    stall = (streams, long, s.stall_warm_tokens)
    (prefix,) = cut(tok, 1, seed + 3, s.prefix_len, 0, s.prefix_len)
    suffixes = cut(tok, s.prefix_requests + 1, seed + 4, 30, 0.3, 64)
    prefixed = [f"{prefix.text}\n\n{q.text}" for q in suffixes]
    openings = cut(tok, s.chats, seed + 5, s.chat_opening, 0, s.chat_opening)
    users = cut(tok, s.chats * (s.turns - 1), seed + 6, s.chat_user, 0.3, 4 * s.chat_user)
    chats = [[o.text, *(u.text for u in users[i :: s.chats])] for i, o in enumerate(openings)]
    jobs = {
        "A": lambda: a_jobs(systems, s.levels, set_a, tok),
        "B": lambda: b_jobs(systems, stall),
        "C": lambda: c_jobs(s, prefixed, chats),
        "D": lambda: d_jobs(args.budget_flag, s.budgets, s.levels[0], set_a, tok, stall),
    }

    wall0 = time.monotonic()
    quiet: dict[str, Any] = {"loadavg_1m": os.getloadavg()[0], "waited_s": 0}
    if not args.quick:
        quiet = compare_servers.wait_for_quiet(args.max_load, args.max_wait_min * 60)
    print(f"start: {quiet}", flush=True)
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for name in sections:
        t0 = time.monotonic()
        print(f"section {name}", flush=True)
        runs = run_jobs(name, setup, jobs[name]())
        raw[name] = [{"run": i, "requests": r.pop("raw")} for i, r in enumerate(runs) if "raw" in r]
        results[name] = {"runs": runs, "wall_s": round(time.monotonic() - t0, 1)}
        print(f"section {name}: {results[name]['wall_s'] / 60:.1f} min", flush=True)

    result = {
        "command": " ".join(["python -m bench.scheduling", *sys.argv[1:]]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": asdict(s),
        "prompts": {
            "A_lengths": [q.prompt_len for q in set_a],
            "A_max_tokens": [q.max_tokens for q in set_a],
            "B_stream_lengths": [q.prompt_len for q in streams],
            "B_long": long.prompt_len,
            "C_prefix": prefix.prompt_len,
        },
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "arch": platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "git": compare_servers.git_state(),
        "base": base,
        "quiet_check": quiet,
        "wall_s": round(time.monotonic() - wall0, 1),
        "sections": results,
        "verdicts": verdicts(results, s.levels),
    }
    png = out.with_name(out.name + ".budgets.png")
    if "D" in results and plot_budgets(results["D"]["runs"], png):
        result["plot"] = png.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_name(out.name + ".md").write_text(markdown(result))
    raw_path = out.parent / "raw" / f"{out.name}.requests.json"
    raw_path.parent.mkdir(exist_ok=True)
    raw_path.write_text(json.dumps(raw) + "\n")
    print(markdown(result))
    print(f"wrote {out}.json, {out}.md and {raw_path}")


if __name__ == "__main__":
    main()
