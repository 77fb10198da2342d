"""Padded vs. packed prefill on this CPU: a reproduction of Prepacking (Zhao et al. 2024).

Every method runs the same prompts (token windows cut from `corpus_documents()`) through the
packserve `Runner`, in the same process, interleaved round-robin over repeats:

- padded:        random order, batches of B, one prompt per row, dense attention
- sorted:        all prompts sorted by length, then batches of B, one per row, dense attention
- packed-dense:  the padded batches, each packed with FFD into rows of capacity = its longest
                 prompt (the paper's choice), dense attention with a block-diagonal mask
- packed-varlen: the same rows, attention computed per prompt segment only

Usage: .venv/bin/python bench/prefill.py [--quick] [--out bench/results] [--profile]
See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from packserve.kernels.corpus import corpus_documents
from packserve.kernels.loader import load_model
from packserve.kernels.model_maker import default_model_dir
from packserve.kernels.runner import Runner, RunnerConfig
from packserve.scheduler import (
    SamplingParams,
    ScheduledSequence,
    SchedulerOutput,
    blocks_for,
    pack_ffd,
)
from transformers import AutoTokenizer, PreTrainedModel

METHODS = ("padded", "sorted", "packed-dense", "packed-varlen")
PACKED = ("packed-dense", "packed-varlen")
BLOCK_SIZE = 16
MEDIAN_LEN, MIN_LEN, MAX_LEN = 100, 8, 1000
# Prompt lengths: lognormal around a median of 100 tokens, clipped to [MIN_LEN, MAX_LEN].
DISTRIBUTIONS = {"narrow": 0.2, "wide": 1.0}  # name -> sigma of log(length)
TARGET_PEAK_FRACTION = 0.85


@dataclass(frozen=True, slots=True)
class Settings:
    """One benchmark run's shape."""

    model_size: str
    dtypes: tuple[str, ...]
    num_prompts: int
    batch_sizes: tuple[int, ...]
    repeats: int
    seed: int
    matmul_n: int
    matmul_reps: int
    stem: str  # output file name stem


FULL = Settings("bench", ("float32", "bfloat16"), 64, (16, 32, 64), 2, 0, 2048, 10, "prefill")
QUICK = Settings("tiny", ("float32", "bfloat16"), 32, (8, 16, 32), 2, 0, 1024, 5, "prefill.quick")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Memory: peak RSS of this process, sampled from /proc/self/statm by a background thread.


def fix_malloc_thresholds() -> bool:
    """Make glibc hand every allocation >= 64 KiB back to the OS when freed.

    By default glibc raises its mmap threshold after large frees (up to 32 MiB), after which
    freed tensors stay in the heap and RSS stops tracking live memory. Setting the thresholds
    explicitly disables that adaptation, so RSS deltas measure what a step really allocates.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(
        libc.mallopt(m_trim_threshold, 128 * 1024)
    )


class RssSampler(threading.Thread):
    """Samples this process's resident set size every `interval` seconds.

    `window_start()` returns the RSS right now and restarts the peak there; `window_peak()`
    returns the highest RSS seen since (including a final read).
    """

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.lock = threading.Lock()
        self.peak = 0
        self.samples = 0
        self.stopped = threading.Event()

    def rss(self) -> int:
        return int(os.pread(self.fd, 256, 0).split()[1]) * self.page

    def run(self) -> None:
        while not self.stopped.is_set():
            value = self.rss()
            with self.lock:
                self.peak = max(self.peak, value)
                self.samples += 1
            time.sleep(self.interval)

    def window_start(self) -> tuple[int, int, float]:
        with self.lock:
            base = self.rss()
            self.peak = base
            return base, self.samples, time.perf_counter()

    def window_peak(self) -> int:
        value = self.rss()
        with self.lock:
            return max(self.peak, value)

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int, reps: int) -> float:
    """Best-of-`reps` GFLOP/s of one torch.mm [m, k] x [k, n]."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def measure_peaks(settings: Settings, hidden: int, intermediate: int) -> dict[str, Any]:
    """Square-matmul peak per dtype, plus one GEMM of the model's MLP shape for reference."""
    n = settings.matmul_n
    out: dict[str, Any] = {"square_n": n, "reps": settings.matmul_reps}
    for name in settings.dtypes:
        dtype = getattr(torch, name)
        out[name] = {
            "square_gflops": matmul_gflops(dtype, n, n, n, settings.matmul_reps),
            "mlp_shape_gflops": matmul_gflops(
                dtype, 4096, hidden, intermediate, settings.matmul_reps
            ),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Prompts


def corpus_token_windows(tokenizer: Any) -> list[list[int]]:
    """Every corpus document tokenized (no special tokens), longest first."""
    docs = corpus_documents()
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return sorted((list(x) for x in ids if len(x) >= MIN_LEN), key=len, reverse=True)


def make_prompts(
    docs: list[list[int]], bos: int, num: int, sigma: float, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """`num` prompts: BOS + a random window of a random document long enough for it."""
    lengths = np.clip(np.rint(np.exp(rng.normal(np.log(MEDIAN_LEN), sigma, num))), MIN_LEN, MAX_LEN)
    doc_lens = [len(d) for d in docs]  # descending
    prompts = []
    for n in lengths.astype(int).tolist():
        fitting = sum(1 for length in doc_lens if length >= n - 1)  # a prefix of `docs`
        doc = docs[int(rng.integers(fitting))]
        start = int(rng.integers(len(doc) - (n - 1) + 1))
        prompts.append((bos, *doc[start : start + n - 1]))
    return prompts


def make_sequences(prompts: list[tuple[int, ...]]) -> tuple[list[ScheduledSequence], int]:
    """One greedy single-token prefill per prompt, each with its own disjoint KV blocks."""
    params = SamplingParams(temperature=0, max_tokens=1)
    seqs, offset = [], 0
    for i, prompt in enumerate(prompts):
        k = blocks_for(len(prompt), BLOCK_SIZE)
        seqs.append(ScheduledSequence(f"p{i}", prompt, 0, tuple(range(offset, offset + k)), params, ()))
        offset += k
    return seqs, offset


# ---------------------------------------------------------------------------------------------
# Methods

Bins = tuple[tuple[ScheduledSequence, ...], ...]


def batches(seqs: list[ScheduledSequence], method: str, batch_size: int) -> list[Bins]:
    """The steps of `method`: batches of `batch_size` prompts, laid out into rows."""
    order = list(seqs)
    if method == "sorted":
        order.sort(key=lambda s: s.num_tokens)  # stable: ties keep the random order
    steps = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if method in PACKED:
            lengths = [s.num_tokens for s in batch]
            rows = pack_ffd(lengths, max(lengths))
            steps.append(tuple(tuple(batch[i] for i in row) for row in rows))
        else:
            steps.append(tuple((s,) for s in batch))
    return steps


def computed_tokens(steps: list[Bins]) -> int:
    """Tokens the model runs, padding included: rows x longest row, per step."""
    return sum(len(b) * max(sum(s.num_tokens for s in row) for row in b) for b in steps)


def model_flops(model: PreTrainedModel, lengths: Sequence[int]) -> float:
    """FLOPs of the useful work: 2 x non-embedding params per real token, causal attention of
    each prompt on itself (QK^T and PV), and the lm head at the one sampled position each."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    params = non_embedding_params(model)
    linear = 2 * params * sum(lengths)
    attention = sum(2 * n * (n + 1) * cfg.num_attention_heads * head_dim for n in lengths)
    head = 2 * cfg.hidden_size * cfg.vocab_size * len(lengths)
    return float(linear + attention * cfg.num_hidden_layers + head)


def non_embedding_params(model: PreTrainedModel) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@dataclass
class Timing:
    """One timed pass of one method over all its batches."""

    seconds: float
    peak_rss_delta: int
    sampled: dict[str, int]
    rss_samples: int
    window_s: float


def run_pass(
    runner: Runner,
    seqs: list[ScheduledSequence],
    method: str,
    batch_size: int,
    mem: RssSampler,
) -> Timing:
    """Lay out (sorting / packing included in the time) and execute every batch."""
    gc.collect()
    base, samples0, t0 = mem.window_start()
    seconds = 0.0
    sampled: dict[str, int] = {}
    start = time.perf_counter()
    for bins in batches(seqs, method, batch_size):
        result = runner.execute(SchedulerOutput(prefill_bins=bins, decodes=(), preempted_ids=()))
        sampled.update(result.sampled_token_ids)
    seconds = time.perf_counter() - start
    peak = mem.window_peak()
    return Timing(seconds, peak - base, sampled, mem.samples - samples0, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(settings: Settings, out_dir: Path) -> dict[str, Any]:
    wall_start = time.perf_counter()
    malloc_fixed = fix_malloc_thresholds()
    mem = RssSampler()
    mem.start()
    load_start = os.getloadavg()
    model_dir = default_model_dir(settings.model_size)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    log(f"model {model_dir}; tokenizing the corpus")
    docs = corpus_token_windows(tokenizer)
    prompts: dict[str, list[tuple[int, ...]]] = {}
    for i, (dist, sigma) in enumerate(DISTRIBUTIONS.items()):
        rng = np.random.default_rng([settings.seed, i])
        prompts[dist] = make_prompts(docs, tokenizer.bos_token_id, settings.num_prompts, sigma, rng)
        lens = [len(p) for p in prompts[dist]]
        log(f"{dist}: {len(lens)} prompts, median {statistics.median(lens)}, max {max(lens)}")

    cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
    log("measuring the matmul peak")
    peaks_start = measure_peaks(settings, cfg.hidden_size, cfg.intermediate_size)
    log(f"matmul peak: {json.dumps(peaks_start)}")

    results: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    model_info: dict[str, Any] = {}
    for dtype in settings.dtypes:
        model, _ = load_model(str(model_dir), dtype=dtype)
        model_info = {
            "path": str(model_dir),
            "size": settings.model_size,
            "params": sum(p.numel() for p in model.parameters()),
            "non_embedding_params": non_embedding_params(model),
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
        }
        for dist in DISTRIBUTIONS:
            seqs, num_blocks = make_sequences(prompts[dist])
            runners = {
                backend: Runner(
                    model,
                    RunnerConfig(
                        attention_backend=backend,
                        num_kv_blocks=num_blocks,
                        block_size=BLOCK_SIZE,
                        seed=settings.seed,
                    ),
                )
                for backend in ("dense", "varlen")
            }

            def runner_of(method: str, runners: dict[str, Runner] = runners) -> Runner:
                return runners["varlen" if method == "packed-varlen" else "dense"]

            # Warm-up: every method once on the first batch of the smallest batch size.
            warm = seqs[: settings.batch_sizes[0]]
            for method in METHODS:
                run_pass(runner_of(method), warm, method, len(warm), mem)
            timings: dict[tuple[int, str], list[Timing]] = {}
            block_start = time.perf_counter()
            loads.append({"dtype": dtype, "distribution": dist, "start": os.getloadavg()})
            for rep in range(settings.repeats):
                for batch_size in settings.batch_sizes:
                    shift = (rep + settings.batch_sizes.index(batch_size)) % len(METHODS)
                    for method in METHODS[shift:] + METHODS[:shift]:  # rotate the order
                        t = run_pass(runner_of(method), seqs, method, batch_size, mem)
                        timings.setdefault((batch_size, method), []).append(t)
                        log(
                            f"{dtype} {dist} rep {rep} B={batch_size} {method}: "
                            f"{t.seconds:.2f}s peak +{t.peak_rss_delta / 2**20:.0f} MiB"
                        )
            loads[-1]["end"] = os.getloadavg()
            loads[-1]["seconds"] = time.perf_counter() - block_start
            results += summarize(model, dtype, dist, seqs, settings, timings)
            del runners
            gc.collect()
        del model
        gc.collect()

    log("measuring the matmul peak again")
    peaks_end = measure_peaks(settings, cfg.hidden_size, cfg.intermediate_size)
    mem.stop()
    peaks = {
        name: max(peaks_start[name]["square_gflops"], peaks_end[name]["square_gflops"])
        for name in settings.dtypes
    }
    for row in results:
        row["matmul_peak_gflops"] = peaks[row["dtype"]]
        row["peak_fraction"] = row["model_gflops"] / peaks[row["dtype"]]
    report = {
        "settings": asdict(settings),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "model": model_info,
        "distributions": {
            dist: {
                "sigma": DISTRIBUTIONS[dist],
                "median_target": MEDIAN_LEN,
                "clip": [MIN_LEN, MAX_LEN],
                "lengths": [len(p) for p in prompts[dist]],
            }
            for dist in DISTRIBUTIONS
        },
        "matmul": {"start": peaks_start, "end": peaks_end, "peak_gflops": peaks},
        "memory_method": (
            "a background thread reads this process's RSS from /proc/self/statm every ~1 ms; "
            "per pass, peak RSS during the pass minus the RSS just before it (after gc); "
            "glibc mmap/trim thresholds pinned via mallopt so freed tensors leave the RSS "
            f"(applied: {malloc_fixed}); the max over repeats is reported"
        ),
        "blocks": loads,
        "results": results,
    }
    report["targets"] = check_targets(results, settings)
    report["runtime_s"] = time.perf_counter() - wall_start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{settings.stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / f"{settings.stem}.md").write_text(markdown(report))
    plot(report, out_dir / f"{settings.stem}.png")
    log(f"wrote {out_dir}/{settings.stem}.{{json,md,png}} in {report['runtime_s']:.0f}s")
    return report


def summarize(
    model: PreTrainedModel,
    dtype: str,
    dist: str,
    seqs: list[ScheduledSequence],
    settings: Settings,
    timings: dict[tuple[int, str], list[Timing]],
) -> list[dict[str, Any]]:
    lengths = [s.num_tokens for s in seqs]
    real = sum(lengths)
    flops = model_flops(model, lengths)
    rows = []
    for batch_size in settings.batch_sizes:
        padded = timings[(batch_size, "padded")]
        padded_s = statistics.median(t.seconds for t in padded)
        padded_tokens = computed_tokens(batches(seqs, "padded", batch_size))
        for method in METHODS:
            ts = timings[(batch_size, method)]
            seconds = statistics.median(t.seconds for t in ts)
            same = sum(ts[-1].sampled[k] == padded[-1].sampled[k] for k in padded[-1].sampled)
            rows.append(
                {
                    "dtype": dtype,
                    "distribution": dist,
                    "batch_size": batch_size,
                    "method": method,
                    "seconds": seconds,
                    "seconds_all": [t.seconds for t in ts],
                    "real_tokens": real,
                    "computed_tokens": computed_tokens(batches(seqs, method, batch_size)),
                    "tokens_per_s": real / seconds,
                    "speedup": padded_s / seconds,
                    "token_ideal_speedup": padded_tokens / real,
                    "peak_rss_mib": max(t.peak_rss_delta for t in ts) / 2**20,
                    "rss_samples_per_s": statistics.median(t.rss_samples / t.window_s for t in ts),
                    "model_gflop": flops / 1e9,
                    "model_gflops": flops / seconds / 1e9,
                    "greedy_agreement_with_padded": same / len(padded[-1].sampled),
                }
            )
    return rows


def check_targets(results: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """The issue's three targets, each checked per configuration."""
    by = {(r["dtype"], r["distribution"], r["batch_size"], r["method"]): r for r in results}
    ideal, vs_sorted, peak = [], [], []
    for dtype in settings.dtypes:
        for dist in DISTRIBUTIONS:
            for b in settings.batch_sizes:
                for method in PACKED:
                    r = by[(dtype, dist, b, method)]
                    s = by[(dtype, dist, b, "sorted")]
                    key = {"dtype": dtype, "distribution": dist, "batch_size": b, "method": method}
                    if dist == "wide":
                        ideal.append(
                            key
                            | {
                                "speedup": r["speedup"],
                                "token_ideal": r["token_ideal_speedup"],
                                "met": r["speedup"] >= r["token_ideal_speedup"],
                            }
                        )
                    vs_sorted.append(
                        key
                        | {
                            "over_sorted": s["seconds"] / r["seconds"],
                            "met": r["seconds"] < s["seconds"],
                        }
                    )
                    if dtype == "float32":
                        peak.append(
                            key
                            | {
                                "peak_fraction": r["peak_fraction"],
                                "met": r["peak_fraction"] >= TARGET_PEAK_FRACTION,
                            }
                        )
    return {
        "prepacked_ge_token_ideal_on_wide": ideal,
        "prepacked_faster_than_sorted": vs_sorted,
        "fp32_ge_85pct_matmul_peak": peak,
    }


# ---------------------------------------------------------------------------------------------
# Reports


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    mm = report["matmul"]["peak_gflops"]
    s = report["settings"]
    lines = [
        f"# Prefill: padded vs. packed ({report['date']})",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, transformers "
        f"{m['transformers']}; model `{report['model']['size']}` "
        f"({report['model']['params'] / 1e6:.0f}M params); {s['num_prompts']} prompts per "
        f"distribution, median of {s['repeats']} interleaved repeats; load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end.",
        "Matmul peak (torch.mm {n}x{n}, best of {r}): ".format(
            n=report["matmul"]["start"]["square_n"], r=report["matmul"]["start"]["reps"]
        )
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in mm.items())
        + ".",
        "",
        "tok/s = real prompt tokens per second; x = speedup over padded; ideal = padded tokens "
        "computed / real tokens; MiB = peak RSS growth; % peak = model FLOP/s on real tokens / "
        "matmul peak. Methods: pad / sort / p-dense / p-varlen.",
        "",
        "| dtype | dist | B | tok/s pad | tok/s sort | tok/s p-dense | tok/s p-varlen "
        "| x sort | x p-dense | x p-varlen | ideal | MiB pad/sort/p-d/p-v | % peak pad/sort/p-d/p-v |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by = {(r["dtype"], r["distribution"], r["batch_size"], r["method"]): r for r in report["results"]}
    for dtype in s["dtypes"]:
        for dist in report["distributions"]:
            for b in s["batch_sizes"]:
                r = {meth: by[(dtype, dist, b, meth)] for meth in METHODS}
                cells = [dtype, dist, str(b)]
                cells += [f"{r[meth]['tokens_per_s']:.0f}" for meth in METHODS]
                cells += [f"{r[meth]['speedup']:.2f}" for meth in METHODS[1:]]
                cells.append(f"{r['padded']['token_ideal_speedup']:.2f}")
                cells.append("/".join(f"{r[meth]['peak_rss_mib']:.0f}" for meth in METHODS))
                cells.append("/".join(f"{100 * r[meth]['peak_fraction']:.0f}" for meth in METHODS))
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    t = report["targets"]
    names = {
        "prepacked_ge_token_ideal_on_wide": "prepacked speedup >= token-ideal on wide",
        "prepacked_faster_than_sorted": "prepacked faster than sorted",
        "fp32_ge_85pct_matmul_peak": "fp32 prefill >= 85% of the matmul peak",
    }
    for key, name in names.items():
        checks = t[key]
        met = [c for c in checks if c["met"]]
        lines.append(f"- {name}: met in {len(met)}/{len(checks)} configurations")
        for method in PACKED:
            mine = [c for c in checks if c["method"] == method]
            bad = [f"{c['dtype']}/{c['distribution']}/B={c['batch_size']}" for c in mine if not c["met"]]
            lines.append(f"  - {method}: " + ("all met" if not bad else "missed " + ", ".join(bad)))
    lines += ["", f"Runtime {report['runtime_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    dists = list(report["distributions"])
    fig, axes = plt.subplots(1, len(dists), figsize=(6 * len(dists), 4.5), squeeze=False)
    by = {(r["dtype"], r["distribution"], r["batch_size"], r["method"]): r for r in report["results"]}
    colors = {"sorted": "tab:orange", "packed-dense": "tab:blue", "packed-varlen": "tab:green"}
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    xs = list(s["batch_sizes"])
    for ax, dist in zip(axes[0], dists, strict=True):
        first = s["dtypes"][0]
        ideal = [by[(first, dist, b, "padded")]["token_ideal_speedup"] for b in xs]
        ax.plot(xs, ideal, "k-", marker="s", lw=2, label="token-ideal (padded / real tokens)")
        ax.axhline(1.0, color="grey", ls=":", lw=1, label="padded")
        for dtype in s["dtypes"]:
            for method, color in colors.items():
                ys = [by[(dtype, dist, b, method)]["speedup"] for b in xs]
                ax.plot(xs, ys, styles.get(dtype, "-"), color=color, marker="o", label=f"{method} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(b) for b in xs])
        ax.set_xlabel("batch size B (prompts per step)")
        ax.set_ylabel("speedup over padded (wall time)")
        lens = report["distributions"][dist]["lengths"]
        ax.set_title(f"{dist}: {len(lens)} prompts, median {int(np.median(lens))}, max {max(lens)}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Prefill speedup over padded, {report['model']['size']} model, {report['machine']['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Profile: where the time of one step goes


CATEGORIES: dict[str, tuple[str, ...]] = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "kv write / gather": ("aten::index_copy", "aten::index", "aten::index_select"),
}


def category(name: str) -> str:
    for cat, prefixes in CATEGORIES.items():
        if name.startswith(prefixes):
            return cat
    return "elementwise / other"


def run_profile(settings: Settings, out_dir: Path) -> None:
    """Profile one step per method (fp32, wide, largest B) with torch.profiler."""
    from packserve.kernels.inputs import prefill_inputs
    from torch.profiler import ProfilerActivity, profile

    model_dir = default_model_dir(settings.model_size)
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    docs = corpus_token_windows(tokenizer)
    rng = np.random.default_rng([settings.seed, list(DISTRIBUTIONS).index("wide")])
    prompts = make_prompts(docs, tokenizer.bos_token_id, settings.num_prompts, DISTRIBUTIONS["wide"], rng)
    seqs, num_blocks = make_sequences(prompts)
    b = settings.batch_sizes[-1]
    peak = matmul_gflops(torch.float32, settings.matmul_n, settings.matmul_n, settings.matmul_n, 10)
    out = [f"fp32 square matmul peak {peak:.0f} GFLOP/s; wide, B={b}, first batch\n"]
    for method in METHODS:
        backend = "varlen" if method == "packed-varlen" else "dense"
        runner = Runner(
            model, RunnerConfig(attention_backend=backend, num_kv_blocks=num_blocks, block_size=16)
        )
        bins = batches(seqs, method, b)[0]
        step = SchedulerOutput(prefill_bins=bins, decodes=(), preempted_ids=())
        runner.execute(step)
        start = time.perf_counter()
        runner.execute(step)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        prefill_inputs(bins, runner.kv_cache, backend, model.dtype)
        inputs_s = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            runner.execute(step)
        events = prof.key_averages()
        per_cat: dict[str, float] = {}
        for ev in events:
            cat = category(ev.key)
            per_cat[cat] = per_cat.get(cat, 0.0) + ev.self_cpu_time_total / 1e6
        total = sum(per_cat.values())
        lengths = [s.num_tokens for row in bins for s in row]
        flops = model_flops(model, lengths)
        rows = len(bins)
        row_len = max(sum(s.num_tokens for s in row) for row in bins)
        gemm_flops = 2 * non_embedding_params(model) * rows * row_len  # computed, not useful
        gemm_s = per_cat.get("gemm", 0.0)
        out.append(
            f"\n== {method}: {rows} rows x {row_len} tokens ({sum(lengths)} real), wall "
            f"{wall:.2f}s unprofiled, model {flops / wall / 1e9:.0f} GFLOP/s = "
            f"{100 * flops / wall / 1e9 / peak:.0f}% of peak; prefill_inputs {inputs_s:.3f}s\n"
        )
        for cat, sec in sorted(per_cat.items(), key=lambda kv: -kv[1]):
            out.append(f"  {cat:22s} {sec:7.2f}s  {100 * sec / total:5.1f}%\n")
        if gemm_s:
            out.append(
                f"  GEMMs run at {gemm_flops / gemm_s / 1e9:.0f} GFLOP/s on computed tokens "
                f"({100 * gemm_flops / gemm_s / 1e9 / peak:.0f}% of peak)\n"
            )
        out.append(events.table(sort_by="self_cpu_time_total", row_limit=15) + "\n")
        log(f"profiled {method}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{settings.stem}.profile.txt"
    path.write_text("".join(out))
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few prompts (<1 min)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--profile", action="store_true", help="profile one step per method instead of the run"
    )
    parser.add_argument("--prompts", type=int, help="override the prompt count per distribution")
    parser.add_argument("--repeats", type=int, help="override the number of timed repeats")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.prompts:
        overrides["num_prompts"] = args.prompts
    if args.repeats:
        overrides["repeats"] = args.repeats
    if overrides:
        settings = Settings(**(asdict(settings) | overrides))
    log(f"settings: {settings}")
    if args.profile:
        run_profile(settings, args.out)
    else:
        run_benchmark(settings, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
