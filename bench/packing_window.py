"""Measure the packing window: when the engine is idle and a prompt arrives, the engine loop
may sleep `packing_window_s` before its first step so that more prompts arrive and share the
prefill. Does that pack more prompts per prefill step, fill bins better, raise throughput, and
what does it cost in time to first token?

An asyncio client drives an `AsyncEngine` directly (no HTTP) with Poisson arrivals of prompts
cut from `corpus_documents()` (lognormal lengths, median ~60 tokens, clipped to 1..500), each
greedy with 16..32 output tokens (`ignore_eos`, so every window produces the same tokens).
For every request rate and repetition the same prompts and arrival times are replayed once
per window; windows are interleaved (rotated order) so machine drift hits all of them alike.
Every `StepStats` is recorded through the `on_step` callback.

    .venv/bin/python -m bench.packing_window                 # bench model (~88M), ~16 min
    .venv/bin/python -m bench.packing_window --quick         # tiny model, < 1 min, to /tmp
    .venv/bin/python -m bench.packing_window --model-size tiny

Writes bench/results/packing_window.{json,md,png} (with --quick: a temporary folder, unless
--out-dir is given).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from packserve.engine import Engine, EngineConfig, EngineLoad, StepStats
from packserve.engine.async_engine import AsyncEngine, Timed
from packserve.models.corpus import corpus_documents
from packserve.models.model_maker import default_model_dir
from packserve.scheduler import SamplingParams

WINDOWS_MS = (0, 2, 5, 10, 20)
# Request rates (req/s) per model: from mostly idle to moderately loaded on 2 CPU cores.
RATES = {"bench": (0.5, 1.0, 2.0), "tiny": (5.0, 10.0, 20.0)}
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_MAX = 60, 0.9, 500
MAX_TOKENS = (16, 32)
# Secondary experiment: a short max_model_len (so a short row capacity) makes multi-row
# prefill steps, where padding to the longest row can show up in bin fill.
SMALL_MODEL_LEN = 544  # >= PROMPT_MAX + max output tokens, a multiple of the block size
RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "packing_window"


@dataclass(frozen=True, slots=True)
class Req:
    offset_s: float  # arrival time from the start of the run
    prompt: list[int]
    max_tokens: int


# -- workload -----------------------------------------------------------------------------------


class PromptMaker:
    """Seeded prompts: a random span of a random corpus document, `n` tokens with BOS."""

    def __init__(self, engine: Engine) -> None:
        self.tokenizer = engine.tokenizer
        self.docs = corpus_documents()
        self.bos = self.tokenizer.bos_token_id
        self._ids: dict[int, list[int]] = {}

    def _doc_ids(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i] = list(self.tokenizer(self.docs[i], add_special_tokens=False).input_ids)
        return self._ids[i]

    def prompts(self, n: int, seed: int) -> list[tuple[list[int], int]]:
        """`n` (prompt token ids, max_tokens) pairs."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            length = round(rng.lognormvariate(math.log(PROMPT_MEDIAN), PROMPT_SIGMA))
            length = min(max(length, 1), PROMPT_MAX)
            while True:
                ids = self._doc_ids(rng.randrange(len(self.docs)))
                if len(ids) >= length:
                    break
            start = rng.randrange(len(ids) - length + 1)
            prompt = [self.bos, *ids[start : start + length - 1]]
            out.append((prompt, rng.randint(*MAX_TOKENS)))
        return out


def make_trace(prompts: list[tuple[list[int], int]], rate: float, seed: int) -> list[Req]:
    """Poisson arrivals at `rate` req/s for the given prompts."""
    rng = random.Random(seed)
    t, trace = 0.0, []
    for prompt, max_tokens in prompts:
        trace.append(Req(t, prompt, max_tokens))
        t += rng.expovariate(rate)
    return trace


# -- one run ------------------------------------------------------------------------------------


async def stream(
    aeng: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams
) -> AsyncIterator[Timed]:
    """One request's deltas until it finishes, through `submit`/`release`."""
    collector: asyncio.Queue[Timed] = asyncio.Queue()
    aeng.submit(request_id, prompt, params, collector)
    finished = False
    try:
        while not finished:
            item = await collector.get()
            finished = item.delta.finish_reason is not None
            yield item
    finally:
        aeng.release(request_id, finished)


async def drive(aeng: AsyncEngine, trace: list[Req], tag: str) -> list[dict[str, float]]:
    """Start `aeng` on this event loop, then submit every request at its arrival time; per
    request: submit, lateness, TTFT, end."""
    aeng.start()
    t0 = time.perf_counter() + 0.05

    async def one(i: int, req: Req) -> dict[str, float]:
        await asyncio.sleep(max(0.0, t0 + req.offset_s - time.perf_counter()))
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        submit = time.perf_counter()
        first = None
        tokens = 0
        async for item in stream(aeng, f"{tag}-{i}", req.prompt, params):
            if item.delta.error:
                raise RuntimeError(f"request {tag}-{i} failed: {item.delta.error}")
            if first is None and item.delta.token_ids:
                first = time.perf_counter()
            tokens += len(item.delta.token_ids)
        end = time.perf_counter()
        assert first is not None
        return {
            "submit": submit - t0,
            "late": submit - t0 - req.offset_s,
            "ttft": first - submit,
            "end": end - t0,
            "tokens": tokens,
        }

    return await asyncio.gather(*(one(i, r) for i, r in enumerate(trace)))


def run_one(engine: Engine, trace: list[Req], window_s: float, tag: str) -> dict[str, Any]:
    """Replay `trace` through a fresh AsyncEngine over `engine` with the given window."""
    steps: list[StepStats] = []
    running_after: list[int] = []  # the engine's running count after each step

    def on_step(stats: StepStats, load: EngineLoad) -> None:
        steps.append(stats)
        running_after.append(load.num_running)

    # The window is an engine setting, read by the loop; one loaded model serves every window.
    engine.config = dataclasses.replace(engine.config, packing_window_ms=window_s * 1000)
    aeng = AsyncEngine.in_thread(engine, on_step=on_step)
    load = os.getloadavg()[0]
    try:
        reqs = asyncio.run(drive(aeng, trace, tag))
    finally:
        aeng.shutdown()  # joins the loop thread: every on_step call has happened
    assert not engine.has_unfinished
    prefills = [s for s in steps if s.num_prefill_tokens]
    # A step with prefills and no decodes started from an idle engine: exactly the steps a
    # window delays. Nothing finishes in its prefill step (max_tokens >= 2, ignore_eos), so
    # the running count after such a step is the number of prompts it prefilled.
    idle = [i for i, s in enumerate(steps) if s.num_prefill_tokens and not s.num_decode_tokens]
    real = sum(s.num_prefill_tokens for s in prefills)
    expected = sum(len(r.prompt) for r in trace)
    preempted = sum(s.num_preempted for s in steps)
    if not preempted and real != expected:
        raise RuntimeError(f"prefilled {real} prompt tokens, expected {expected}")
    span = max(r["end"] for r in reqs) - min(r["submit"] for r in reqs)
    return {
        "tag": tag,
        "window_ms": round(window_s * 1000, 3),
        "loadavg_1m": load,
        "wall_s": span,
        "busy_s": sum(s.step_time_s for s in steps),
        "steps": len(steps),
        "prefill_steps": len(prefills),
        "prefill_rows": sum(s.num_prefill_rows for s in prefills),
        "prefill_tokens": real,
        "row_tokens": sum(s.num_row_tokens for s in prefills),  # decode tokens mixed in too
        "padded_prefill_tokens": sum(s.num_padded_prefill_tokens for s in prefills),
        "idle_start_steps": len(idle),
        "idle_start_prompts": sum(running_after[i] for i in idle),
        "preempted": preempted,
        "output_tokens": sum(int(r["tokens"]) for r in reqs),
        "ttft_s": [round(r["ttft"], 6) for r in reqs],
        "max_late_s": max(r["late"] for r in reqs),
    }


# -- aggregation --------------------------------------------------------------------------------


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def aggregate(runs: list[dict[str, Any]], num_prompts: int) -> dict[str, Any]:
    """One (rate, window) cell over its repetitions; `runs` in repetition order."""

    def total(key: str) -> float:
        return sum(r[key] for r in runs)

    ttft = [t for r in runs for t in r["ttft_s"]]
    return {
        "runs": len(runs),
        "requests": len(ttft),
        "prefill_steps": total("prefill_steps"),
        "prompts_per_prefill_step": num_prompts / total("prefill_steps"),
        "rows_per_prefill_step": total("prefill_rows") / total("prefill_steps"),
        "bin_fill": total("row_tokens") / total("padded_prefill_tokens"),
        "idle_start_steps": total("idle_start_steps"),
        "idle_start_frac": total("idle_start_prompts") / len(ttft),
        "prompts_per_idle_start_step": total("idle_start_prompts")
        / max(total("idle_start_steps"), 1),
        "preempted": total("preempted"),
        "ttft_mean_ms": 1000 * statistics.fmean(ttft),
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "throughput_tok_s": total("output_tokens") / total("wall_s"),
        "wall_s": total("wall_s"),
        "busy_frac": total("busy_s") / total("wall_s"),
        "loadavg_1m_mean": statistics.fmean(r["loadavg_1m"] for r in runs),
    }


def paired_delta(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean and standard error (ms) of per-request TTFT minus the same request's at 0 ms."""
    diffs = [
        1000 * (a - b) for r, r0 in zip(runs, base, strict=True)
        for a, b in zip(r["ttft_s"], r0["ttft_s"], strict=True)
    ]  # fmt: skip
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), se


def summarize(
    runs: list[dict[str, Any]], rates: Sequence[float], n: int, reps: int
) -> list[dict[str, Any]]:
    cells = []
    for rate in rates:
        per_window = {
            w: sorted(
                (r for r in runs if r["rate"] == rate and r["window_ms"] == w),
                key=lambda r: r["rep"],
            )
            for w in WINDOWS_MS
        }
        for w in WINDOWS_MS:
            cell = {"rate": rate, "window_ms": w, **aggregate(per_window[w], n * reps)}
            mean, se = paired_delta(per_window[w], per_window[0])
            cell["dttft_mean_ms"], cell["dttft_se_ms"] = mean, se
            cell["dttft_rep_means_ms"] = [
                paired_delta([r], [r0])[0]
                for r, r0 in zip(per_window[w], per_window[0], strict=True)
            ]
            cells.append(cell)
    return cells


# -- experiment ---------------------------------------------------------------------------------


def warm_up(engine: Engine, maker: PromptMaker) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [p for p, _ in maker.prompts(8, seed=12345)]
    engine.generate(prompts, params)
    for p in prompts[:3]:
        engine.generate([p], params)


def experiment(
    engine: Engine,
    maker: PromptMaker,
    rates: Sequence[float],
    n: int,
    reps: int,
    seed: int,
    label: str,
) -> list[dict[str, Any]]:
    """Every (rep, rate) trace once per window, windows in a rotated order."""
    runs = []
    k = 0
    total = reps * len(rates) * len(WINDOWS_MS)
    for rep in range(reps):
        prompts = maker.prompts(n, seed=seed * 1000 + rep)
        for ri, rate in enumerate(rates):
            trace = make_trace(prompts, rate, seed=seed * 1000 + rep * 100 + ri + 1)
            shift = (rep * len(rates) + ri) % len(WINDOWS_MS)
            for w in WINDOWS_MS[shift:] + WINDOWS_MS[:shift]:
                k += 1
                run = run_one(engine, trace, w / 1000, f"{label}-{rep}-{ri}-{w}")
                run.update(rate=rate, rep=rep, order=k)
                runs.append(run)
                ttft = run["ttft_s"]
                print(
                    f"[{label} {k}/{total}] rate={rate:g}/s rep={rep} window={w}ms "
                    f"prefill_steps={run['prefill_steps']} "
                    f"ttft_p50={1000 * percentile(ttft, 50):.1f}ms "
                    f"wall={run['wall_s']:.1f}s load={run['loadavg_1m']:.2f}",
                    flush=True,
                )
    return runs


# -- report -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def table(cells: list[dict[str, Any]]) -> list[str]:
    head = (
        "| rate (req/s) | window (ms) | prefill steps | prompts / prefill step "
        "| idle-start steps | prompts / idle-start step | bin fill | TTFT mean (ms) "
        "| TTFT p50 (ms) | TTFT p99 (ms) | ΔTTFT vs 0 ms, paired (ms) | throughput (tok/s) "
        "| busy | wall (s) | load 1m |"
    )
    lines = [head, "|" + "---|" * head.count(" |")]
    for c in cells:
        lines.append(
            f"| {c['rate']:g} | {c['window_ms']:g} | {c['prefill_steps']} "
            f"| {c['prompts_per_prefill_step']:.2f} | {c['idle_start_steps']} "
            f"| {c['prompts_per_idle_start_step']:.2f} | {c['bin_fill']:.3f} "
            f"| {c['ttft_mean_ms']:.1f} | {c['ttft_p50_ms']:.1f} | {c['ttft_p99_ms']:.1f} "
            f"| {c['dttft_mean_ms']:+.1f} ± {c['dttft_se_ms']:.1f} "
            f"| {c['throughput_tok_s']:.1f} | {100 * c['busy_frac']:.0f}% | {c['wall_s']:.1f} "
            f"| {c['loadavg_1m_mean']:.1f} |"
        )
    return lines


def noise_swing(cells: list[dict[str, Any]]) -> float | None:
    """The largest |paired mean TTFT change| at the smallest window if it is too large to be
    the window's doing (a window of w ms delays only the requests that find the engine idle,
    by w, plus what queues behind them), else None."""
    small_w = WINDOWS_MS[1]
    swing = max(abs(c["dttft_mean_ms"]) for c in cells if c["window_ms"] == small_w)
    return swing if swing > 5 * small_w + 10 else None


def conclusion(cells: list[dict[str, Any]], small: list[dict[str, Any]]) -> list[str]:
    """Three data-driven lines: packing/bin fill and throughput, TTFT cost, recommendation."""
    rates = sorted({c["rate"] for c in cells})
    top = max(WINDOWS_MS)

    def cell(rate: float, w: int, src: list[dict[str, Any]] = cells) -> dict[str, Any]:
        return next(c for c in src if c["rate"] == rate and c["window_ms"] == w)

    def pct(new: float, old: float) -> str:
        change = round(100 * (new / old - 1))
        return f"{change:+d}%" if change else "±0%"

    steps = ", ".join(
        f"{pct(cell(r, top)['prefill_steps'], cell(r, 0)['prefill_steps'])} at {r:g}/s"
        for r in rates
    )
    thr = ", ".join(
        f"{pct(cell(r, top)['throughput_tok_s'], cell(r, 0)['throughput_tok_s'])}" for r in rates
    )
    fills = [c["bin_fill"] for c in cells]
    line1 = (
        f"**Packing / throughput:** a {top} ms window changes the number of prefill steps by "
        f"{steps}; bin fill stays {min(fills):.3f}-{max(fills):.3f} (with the default row "
        f"capacity every step's prompts fit one row, so there is no padding to remove)"
    )
    if small:
        sf = [c["bin_fill"] for c in small]
        line1 += (
            f", and with {SMALL_MODEL_LEN}-token rows it is {min(sf):.3f}-{max(sf):.3f} "
            f"({cell(small[0]['rate'], 0, small)['bin_fill']:.3f} at 0 ms, "
            f"{cell(small[0]['rate'], top, small)['bin_fill']:.3f} at {top} ms)"
        )
    line1 += f"; end-to-end throughput changes by {thr} (low to high rate)."
    deltas = ", ".join(
        f"{w} ms: " + "/".join(f"{cell(r, w)['dttft_mean_ms']:+.0f}" for r in rates)
        for w in WINDOWS_MS[1:]
    )
    idle = "/".join(f"{100 * cell(r, 0)['idle_start_frac']:.0f}%" for r in rates)
    direct = max(cell(r, 0)["idle_start_frac"] for r in rates) * top
    small_w = WINDOWS_MS[1]
    swing = noise_swing(cells)
    noisy = swing is not None
    loads = [c["loadavg_1m_mean"] for c in cells]
    line2 = (
        f"**Cost:** with no window {idle} of requests ({'/'.join(f'{r:g}' for r in rates)} "
        f"req/s) found the engine idle, so a {top} ms window adds about that share of {top} ms "
        f"to mean TTFT (<= {direct:.1f} ms; those requests wait the full window). Measured "
        f"paired mean TTFT change vs no window: {deltas} ms"
    )
    if noisy:
        line2 += (
            f"; swings this large (a {small_w} ms window moved the mean by up to {swing:.0f} ms) "
            f"cannot come from the window: at a 1-min load average of {min(loads):.1f}-"
            f"{max(loads):.1f} on {os.cpu_count()} cores TTFT, throughput and even prefill "
            "step counts (a slowed engine batches more prompts per step) are contention noise; "
            "prompts per idle-start step, set by the window and the arrivals alone, is the "
            "reliable measure of what the window packs."
        )
    else:
        line2 += "."
    # Recommend a window only if it does what it is for (more prompts per prefill step) and
    # that shows: throughput up by more than 2% at every rate, or mean TTFT lower by more
    # than two standard errors averaged over the rates and in every repetition; never when
    # TTFT is worse by more than two standard errors at some rate, or the run is noisy.
    best, best_gain, why = 0, -math.inf, ""
    for w in WINDOWS_MS[1:]:
        cs = [cell(r, w) for r in rates]
        packs = any(
            c["prompts_per_prefill_step"] > 1.05 * cell(c["rate"], 0)["prompts_per_prefill_step"]
            for c in cs
        )
        avg = statistics.fmean(c["dttft_mean_ms"] for c in cs)
        se = math.sqrt(sum(c["dttft_se_ms"] ** 2 for c in cs)) / len(cs)
        faster = all(
            c["throughput_tok_s"] > 1.02 * cell(c["rate"], 0)["throughput_tok_s"] for c in cs
        )
        every_rep = all(
            statistics.fmean(rep) < 0
            for rep in zip(*(c["dttft_rep_means_ms"] for c in cs), strict=True)
        )
        hurts = any(c["dttft_mean_ms"] > 2 * c["dttft_se_ms"] for c in cs)
        helps = (avg < -2 * se and every_rep) or faster
        if packs and helps and not hurts and not noisy and -avg > best_gain:
            best, best_gain = w, -avg
            why = f"TTFT {avg:+.1f} ± {se:.1f} ms averaged over the rates" + (
                ", throughput up > 2% at every rate" if faster else ""
            )
    if best:
        line3 = f"**Recommendation:** default `--packing-window-ms {best}` ({why})."
    else:
        hi = max(rates)
        line3 = (
            "**Recommendation:** keep the default at 0 ms (off). The window only acts when "
            f"the engine is idle, and then a {top} ms window expects rate x window = "
            f"{hi * top / 1000:.2f} extra prompts at {hi:g} req/s (measured prompts per "
            f"idle-start step: {cell(hi, 0)['prompts_per_idle_start_step']:.2f} at 0 ms, "
            f"{cell(hi, top)['prompts_per_idle_start_step']:.2f} at {top} ms), while prompts "
            "that arrive during a step are packed into the next step anyway; no window met the "
            "bar (more prompts per prefill step and either > 2% throughput at every rate or a "
            "TTFT gain beyond noise), so it costs TTFT for no measured gain."
        )
    return [line1, line2, line3]


def plot_title(size: str, date: str, cells: list[dict[str, Any]]) -> str:
    title = f"Packing window, {size} model, {date[:10]}"
    if noise_swing(cells) is not None:
        loads = [c["loadavg_1m_mean"] for c in cells]
        title += (
            f" - load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores: "
            f"TTFT differences are contention noise (a {WINDOWS_MS[1]} ms window cannot move "
            f"TTFT by {noise_swing(cells):.0f} ms)"
        )
    return title


def write_plot(cells: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for rate in sorted({c["rate"] for c in cells}):
        cs = [c for c in cells if c["rate"] == rate]
        ws = [c["window_ms"] for c in cs]
        label = f"{rate:g} req/s"
        axes[0].plot(ws, [c["ttft_p50_ms"] for c in cs], "o-", label=label)
        axes[1].errorbar(
            ws,
            [c["dttft_mean_ms"] for c in cs],
            yerr=[2 * c["dttft_se_ms"] for c in cs],
            fmt="o-",
            capsize=3,
            label=label,
        )
        axes[2].plot(ws, [c["prefill_steps"] for c in cs], "o-", label=label)
    axes[1].plot(WINDOWS_MS, WINDOWS_MS, "k:", label="+window")
    axes[1].axhline(0, color="grey", lw=0.5)
    labels = (
        "TTFT p50 (ms)",
        "paired mean ΔTTFT vs 0 ms (ms, ±2 SE)",
        "prefill steps (all repetitions)",
    )
    for ax, ylabel in zip(axes, labels, strict=True):
        ax.set_xlabel("packing window (ms)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(WINDOWS_MS)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-size", choices=("tiny", "bench"), default="bench")
    ap.add_argument("--quick", action="store_true", help="tiny model, few requests, < 1 min")
    ap.add_argument("--rates", type=float, nargs="+", help="req/s (default: per model)")
    ap.add_argument("--requests", type=int, help="requests per trace (default 24; quick 20)")
    ap.add_argument("--reps", type=int, help="traces per rate (default 2; quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-small-rows", action="store_true", help="skip the short-row run")
    ap.add_argument("--out-dir", type=Path, help="default bench/results (quick: a temp dir)")
    args = ap.parse_args(argv)

    size = "tiny" if args.quick else args.model_size
    rates = tuple(args.rates or (RATES[size][1:] if args.quick else RATES[size]))
    n = args.requests or (20 if args.quick else 24)
    reps = args.reps or (1 if args.quick else 2)
    out_dir = args.out_dir or (
        Path(tempfile.gettempdir()) / "packserve-bench" if args.quick else RESULTS_DIR
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    load_start = os.getloadavg()
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    model_dir = default_model_dir(size)
    # Every window replays the same trace: with the prefix cache on, only the first would
    # prefill its prompts.
    engine = Engine(EngineConfig(model=str(model_dir), seed=args.seed, enable_prefix_caching=False))
    maker = PromptMaker(engine)
    warm_up(engine, maker)
    row_capacity = engine.info.row_capacity
    print(f"model {size} ({model_dir}), row capacity {row_capacity}, rates {rates}, "
          f"{n} requests x {reps} reps, windows {WINDOWS_MS} ms", flush=True)  # fmt: skip

    runs = experiment(engine, maker, rates, n, reps, args.seed, "main")
    cells = summarize(runs, rates, n, reps)

    small_runs: list[dict[str, Any]] = []
    small_cells: list[dict[str, Any]] = []
    if not args.no_small_rows:
        small_engine = Engine(
            EngineConfig(
                model=str(model_dir),
                seed=args.seed,
                max_model_len=SMALL_MODEL_LEN,
                enable_prefix_caching=False,
            )
        )
        warm_up(small_engine, maker)
        small_rates = rates[-1:]
        small_runs = experiment(small_engine, maker, small_rates, n, reps, args.seed, "small")
        small_cells = summarize(small_runs, small_rates, n, reps)

    load_end = os.getloadavg()
    runtime = time.perf_counter() - started
    command = " ".join(
        ["python -m bench.packing_window", *(sys.argv[1:] if argv is None else argv)]
    )
    lines = conclusion(cells, small_cells)
    n_params = sum(p.numel() for p in engine.model.parameters())
    setup = {
        "model_size": size,
        "model_params": n_params,
        "model_dir": str(model_dir),
        "row_capacity": row_capacity,
        "max_num_batched_tokens": engine.info.max_num_batched_tokens,
        "attention_backend": engine.config.attention_backend,
        "prefill_mode": engine.config.prefill_mode,
        "rates_req_s": list(rates),
        "windows_ms": list(WINDOWS_MS),
        "requests_per_trace": n,
        "reps": reps,
        "prompt_tokens": f"lognormal median {PROMPT_MEDIAN} sigma {PROMPT_SIGMA}, "
        f"clipped 1..{PROMPT_MAX}",
        "max_tokens": f"uniform {MAX_TOKENS[0]}..{MAX_TOKENS[1]}, greedy, ignore_eos",
        "seed": args.seed,
        "small_rows_max_model_len": None if args.no_small_rows else SMALL_MODEL_LEN,
    }
    machine = {
        **machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "date_utc": date,
        "runtime_s": runtime,
        "command": command,
    }
    result = {
        "setup": setup,
        "machine": machine,
        "cells": cells,
        "small_rows_cells": small_cells,
        "conclusion": lines,
        "runs": runs,
        "small_rows_runs": small_runs,
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")

    prompt_lens = [
        len(p) for rep in range(reps) for p, _ in maker.prompts(n, seed=args.seed * 1000 + rep)
    ]
    md = [
        "# Packing window",
        "",
        f"`{command}` — {date}, {runtime / 60:.1f} min. Model `{size}` ({n_params / 1e6:.0f}M "
        f"params, float32, {engine.config.attention_backend} attention, packed prefill, row "
        f"capacity {row_capacity} tokens). {machine['cpu_model']}, {machine['cpu_cores']} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads). Load average (1/5/15 "
        f"min) {'/'.join(f'{x:.2f}' for x in load_start)} at start, "
        f"{'/'.join(f'{x:.2f}' for x in load_end)} at end (other processes shared the machine).",
        "",
        f"Workload: an asyncio client drives `AsyncEngine` directly (no HTTP); {reps} trace(s) "
        f"of {n} requests per rate, Poisson arrivals; prompts are spans of `corpus_documents()` "
        f"(lognormal, median {PROMPT_MEDIAN}, clipped 1..{PROMPT_MAX}; these have median "
        f"{statistics.median(prompt_lens):g}, mean {statistics.fmean(prompt_lens):.0f}, max "
        f"{max(prompt_lens)} tokens); greedy, {MAX_TOKENS[0]}..{MAX_TOKENS[1]} output tokens "
        "(`ignore_eos`). Each trace is replayed once per window, windows interleaved in a "
        "rotated order. TTFT is submit -> first token at the client; throughput is output "
        "tokens over first submit -> last completion; *busy* is the summed step time over that "
        "span. *Idle-start steps* are prefill steps with no decodes: the steps a window delays. "
        "ΔTTFT is the mean over requests of (TTFT at this window − the same request's TTFT at "
        "0 ms) ± one standard error (treating requests as independent, which queueing makes "
        "them not, so it understates the uncertainty); *load 1m* is the mean 1-minute load "
        "average at the start of the cell's runs; TTFT p99 is near the maximum at these "
        "request counts.",
        "",
        *table(cells),
        "",
    ]
    if small_cells:
        md += [
            f"Short rows (max_model_len {SMALL_MODEL_LEN}, so row capacity {SMALL_MODEL_LEN}; "
            "same traces at the highest rate), to see whether a window changes bin fill when a "
            "step needs several rows:",
            "",
            *table(small_cells),
            "",
        ]
    md += ["## Conclusion", "", *(f"{line}  " for line in lines), "", f"![plot]({NAME}.png)", ""]
    (out_dir / f"{NAME}.md").write_text("\n".join(md))
    write_plot(cells, out_dir / f"{NAME}.png", plot_title(size, date, cells))

    print("\n".join(table(cells)))
    if small_cells:
        print("\n".join(table(small_cells)))
    print("\n".join(lines))
    print(f"wrote {out_dir}/{NAME}.{{json,md,png}} in {runtime:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
