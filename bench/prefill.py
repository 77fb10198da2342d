"""Padded vs. packed prefill on this CPU: a reproduction of Prepacking (Zhao et al. 2024).

Every method runs the same prompts (token windows cut from `corpus_documents()`) through the
packserve `Runner`, in the same process, interleaved round-robin over repeats:

- padded:        random order, batches of B, one prompt per row, dense attention
- sorted:        all prompts sorted by length, then batches of B, one per row, dense attention
- packed-dense:  the padded batches, each packed into rows as the engine packs them
                 (`pack_rows`: FFD at the row capacity among longest prompt x 1, 2, 4, ...
                 up to MAX_ROW_LEN that computes the fewest tokens; the paper uses x 1 only),
                 dense attention with a block-diagonal mask
- packed-varlen: the same rows, attention computed per prompt segment only

Usage: .venv/bin/python -m bench.prefill [--quick] [--out bench/results] [--profile]
       [--device cuda] [--dtypes float32,bfloat16] [--batch-sizes 16,32,64] [--distributions wide]
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
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, PreTrainedModel

from packserve.engine.config import EngineConfig
from packserve.engine.engine import kernel_cache_dir
from packserve.kernels.linear import pack_weight, packed_linear
from packserve.kernels.loader import load_model
from packserve.kernels.runner import Runner, RunnerConfig
from packserve.models.corpus import corpus_documents
from packserve.models.model_maker import default_model_dir
from packserve.scheduler import (
    NewRequest,
    SamplingParams,
    ScheduledSequence,
    SchedulerOutput,
    blocks_for,
    pack_rows,
)

METHODS = ("padded", "sorted", "packed-dense", "packed-varlen")
PACKED = ("packed-dense", "packed-varlen")
BLOCK_SIZE = EngineConfig().block_size
MEDIAN_LEN, MIN_LEN, MAX_LEN = 100, 8, 1000
MAX_ROW_LEN = 1024  # the widest packed row (the engine's --max-prefill-row-len)
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
    max_len: int  # prompt lengths are clipped to [MIN_LEN, max_len]
    stem: str  # output file name stem
    distributions: tuple[str, ...] = tuple(DISTRIBUTIONS)  # which of DISTRIBUTIONS to run
    device: str = "cpu"  # torch device of the model, the KV pool and the matmul peak


FULL = Settings(
    model_size="bench",
    dtypes=("float32", "bfloat16"),
    num_prompts=64,
    batch_sizes=(16, 32, 64),
    repeats=2,
    seed=0,
    matmul_n=2048,
    matmul_reps=10,
    max_len=MAX_LEN,
    stem="prefill",
)
QUICK = Settings(
    model_size="tiny",
    dtypes=("float32", "bfloat16"),
    num_prompts=8,
    batch_sizes=(2, 4, 8),
    repeats=2,
    seed=0,
    matmul_n=1024,
    matmul_reps=5,
    max_len=256,
    stem="prefill.quick",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Memory: peak RSS of this process, sampled from /proc/self/statm by a background thread.


_LIBC: ctypes.CDLL | None = None


def release_free_memory() -> bool:
    """Hand memory that glibc keeps after frees back to the OS (malloc_trim), so the RSS
    before a pass counts live memory only and everything the pass touches shows as growth.

    malloc's own tuning is left alone (a pinned mmap threshold would also make RSS exact,
    but it costs ~4x the page faults and ~10% of the prefill time on this machine).
    """
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


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


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall times cover it."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def matmul_gflops(
    dtype: torch.dtype, m: int, k: int, n: int, reps: int, backend: str, device: str = "cpu"
) -> float:
    """Best-of-`reps` GFLOP/s of one [m, k] x [k, n] product: `torch.mm` (MKL on CPU for
    float32), or oneDNN with the right-hand side prepacked (what `PackedLinear` runs). On a
    GPU each rep times 10 back-to-back products between two synchronizations."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    if backend == "oneDNN":
        packed = pack_weight(b.t())

        def run() -> None:
            packed_linear(a, packed)
    else:
        out = torch.empty(m, n, dtype=dtype, device=device)

        def run() -> None:
            torch.mm(a, b, out=out)

    inner = 10 if is_cuda(device) else 1
    run()  # warm-up
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            run()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * m * k * n / best / 1e9


def gemm_shapes(settings: Settings, cfg: Any) -> dict[str, tuple[int, int, int]]:
    """Square matmuls and the model's own GEMMs (M = 4096 tokens): the candidates for the peak."""
    n, h, i = settings.matmul_n, cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    m = 4096
    return {
        f"square {n}": (n, n, n),
        "square 1024": (1024, 1024, 1024),
        f"q/o {m}x{h}x{h}": (m, h, h),
        f"k/v {m}x{h}x{kv}": (m, h, kv),
        f"gate/up {m}x{h}x{i}": (m, h, i),
        f"down {m}x{i}x{h}": (m, i, h),
    }


def measure_peaks(settings: Settings, shapes: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    """Best-of-reps GFLOP/s per dtype, shape and GEMM library (torch.mm and, on the CPU,
    oneDNN)."""
    backends = ("torch.mm",) if is_cuda(settings.device) else ("torch.mm", "oneDNN")
    return {
        name: {
            f"{label} ({backend})": matmul_gflops(
                getattr(torch, name), *shape, settings.matmul_reps, backend, settings.device
            )
            for label, shape in shapes.items()
            for backend in backends
        }
        for name in settings.dtypes
    }


# ---------------------------------------------------------------------------------------------
# Prompts


def seeded_prompts(
    docs: list[list[int]], tokenizer: Any, settings: Settings, dist: str
) -> list[tuple[int, ...]]:
    """The prompts of distribution `dist`, seeded by its index: every run gets the same."""
    rng = np.random.default_rng([settings.seed, list(DISTRIBUTIONS).index(dist)])
    return make_prompts(
        docs,
        tokenizer.bos_token_id,
        settings.num_prompts,
        DISTRIBUTIONS[dist],
        settings.max_len,
        rng,
    )


def corpus_token_windows(tokenizer: Any) -> list[list[int]]:
    """Every corpus document tokenized (no special tokens), longest first."""
    docs = corpus_documents()
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return sorted((list(x) for x in ids if len(x) >= MIN_LEN), key=len, reverse=True)


def make_prompts(
    docs: list[list[int]],
    bos: int,
    num: int,
    sigma: float,
    max_len: int,
    rng: np.random.Generator,
) -> list[tuple[int, ...]]:
    """`num` prompts: BOS + a random window of a random document long enough for it."""
    lengths = np.exp(rng.normal(np.log(MEDIAN_LEN), sigma, num))
    lengths = np.clip(np.rint(lengths), MIN_LEN, max_len)
    doc_lens = [len(d) for d in docs]  # descending
    prompts = []
    for n in lengths.astype(int).tolist():
        fitting = sum(1 for length in doc_lens if length >= n - 1)  # a prefix of `docs`
        doc = docs[int(rng.integers(fitting))]
        start = int(rng.integers(len(doc) - (n - 1) + 1))
        prompts.append((bos, *doc[start : start + n - 1]))
    return prompts


Bins = tuple[tuple[ScheduledSequence, ...], ...]
Requests = dict[str, NewRequest]


def make_sequences(
    prompts: list[tuple[int, ...]],
) -> tuple[list[ScheduledSequence], Requests, int]:
    """One greedy single-token prefill per prompt, each with its own disjoint KV blocks: the
    segments, what the runner keeps per request, and the number of blocks."""
    params = SamplingParams(temperature=0, max_tokens=1)
    seqs, requests, offset = [], {}, 0
    for i, prompt in enumerate(prompts):
        k = blocks_for(len(prompt), BLOCK_SIZE)
        blocks = tuple(range(offset, offset + k))
        seqs.append(ScheduledSequence(f"p{i}", prompt, 0, (), is_decode=False, sample=True))
        requests[f"p{i}"] = NewRequest(f"p{i}", params, tuple(prompt), (), blocks)
        offset += k
    return seqs, requests, offset


def runner_config(backend: str, num_blocks: int, seed: int | None) -> RunnerConfig:
    """A runner with exactly the prompts' blocks, default engine kernels otherwise."""
    engine = EngineConfig()
    return RunnerConfig(
        attention_backend=backend,  # type: ignore[arg-type]
        linear_backend=engine.linear_backend,
        decode_attention=engine.decode_attention,
        quantization=engine.quantization,
        int4_group_size=engine.int4_group_size,
        kernel_cache_dir=kernel_cache_dir(),
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=engine.kv_cache_memory_mb << 20,
        num_kv_blocks=num_blocks,
        seed=seed,
        batch_invariant=False,
        max_model_len=engine.resolved_max_model_len(None),
        eos_token_ids=frozenset(),
    )


def prefill_step(bins: Bins, requests: Requests) -> SchedulerOutput:
    """One step prefilling `bins`, its requests (re)admitted: a step may run again."""
    admitted = tuple(requests[seq.request_id] for row in bins for seq in row)
    return SchedulerOutput(
        new_requests=admitted, rows=bins, decode_batch=(), preempted_ids=(), finished_ids=()
    )


# ---------------------------------------------------------------------------------------------
# Methods


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
            rows = pack_rows(lengths, MAX_ROW_LEN)
            steps.append(tuple(tuple(batch[i] for i in row) for row in rows))
        else:
            steps.append(tuple((s,) for s in batch))
    return steps


def computed_tokens(steps: list[Bins]) -> int:
    """Tokens the model runs, padding included: rows x longest row, per step."""
    return sum(len(b) * max(sum(s.num_tokens for s in row) for row in b) for b in steps)


def model_flops(model: PreTrainedModel, params: int, lengths: Sequence[int]) -> float:
    """FLOPs of the useful work: 2 x non-embedding params (`params`, counted as loaded: a
    Runner stacks sibling projections into weights that are no parameters) per real token,
    causal attention of each prompt on itself (QK^T and PV), and the lm head at the one
    sampled position each."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    linear = 2 * params * sum(lengths)
    attention = sum(2 * n * (n + 1) * cfg.num_attention_heads * head_dim for n in lengths)
    head = 2 * cfg.hidden_size * cfg.vocab_size * len(lengths)
    return float(linear + attention * cfg.num_hidden_layers + head)


def non_embedding_params(model: PreTrainedModel) -> int:
    """Of the model as loaded (before a Runner fuses its projections)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@dataclass
class Timing:
    """One method's pass over all prompts at one batch size (its steps summed)."""

    seconds: float = 0.0  # wall time of the steps plus the layout (sorting / packing)
    cpu_seconds: float = 0.0  # user + system CPU time of this process (all threads)
    peak_rss_delta: int = 0  # max over steps of (peak RSS in the step - RSS before it)
    rss_samples: int = 0
    sampled_s: float = 0.0  # time covered by the RSS sampler windows
    steps: int = 0
    sampled: dict[str, int] = field(default_factory=dict)


def run_step(
    runner: Runner, bins: Bins, requests: Requests, mem: RssSampler, timing: Timing
) -> None:
    """Execute one step, adding its wall time, CPU time and memory growth to `timing` (RSS on
    the CPU; on a GPU the peak of the caching allocator's allocated bytes)."""
    gpu = is_cuda(runner.device)
    release_free_memory()
    if gpu:
        synchronize(runner.device)
        gpu_base = torch.cuda.memory_allocated(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
    base, samples0, t0 = mem.window_start()
    cpu0 = process_cpu_seconds()
    start = time.perf_counter()
    result = runner.execute(prefill_step(bins, requests), torch.get_num_threads())
    synchronize(runner.device)
    timing.seconds += time.perf_counter() - start
    timing.cpu_seconds += process_cpu_seconds() - cpu0
    if gpu:
        growth = torch.cuda.max_memory_allocated(runner.device) - gpu_base
    else:
        growth = mem.window_peak() - base
    timing.peak_rss_delta = max(timing.peak_rss_delta, growth)
    timing.rss_samples += mem.samples - samples0
    timing.sampled_s += time.perf_counter() - t0
    timing.steps += 1
    timing.sampled.update(result.sampled_token_ids)


def run_interleaved(
    runner_of: Callable[[str], Runner],
    seqs: list[ScheduledSequence],
    requests: Requests,
    batch_size: int,
    rotation: int,
    mem: RssSampler,
) -> dict[str, Timing]:
    """Every method over all prompts at `batch_size`, interleaved step by step: step i of each
    method runs before step i + 1 of any, in an order rotated every step, so a burst of load
    from other processes hits all methods alike."""
    gc.collect()
    timings = {method: Timing() for method in METHODS}
    plans = {}
    for method in METHODS:
        start = time.perf_counter()
        plans[method] = batches(seqs, method, batch_size)
        timings[method].seconds += time.perf_counter() - start  # sorting / packing counts
    for i in range(len(plans["padded"])):
        shift = (rotation + i) % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            run_step(runner_of(method), plans[method][i], requests, mem, timings[method])
    return timings


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(settings: Settings, out_dir: Path) -> dict[str, Any]:
    wall_start = time.perf_counter()
    malloc_trim = release_free_memory()
    mem = RssSampler()
    mem.start()
    load_start = os.getloadavg()
    model_dir = default_model_dir(settings.model_size)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    log(f"model {model_dir}; tokenizing the corpus")
    docs = corpus_token_windows(tokenizer)
    prompts: dict[str, list[tuple[int, ...]]] = {}
    for dist in settings.distributions:  # seeded by the index in DISTRIBUTIONS: same prompts
        prompts[dist] = seeded_prompts(docs, tokenizer, settings, dist)
        lens = [len(p) for p in prompts[dist]]
        log(f"{dist}: {len(lens)} prompts, median {statistics.median(lens)}, max {max(lens)}")

    cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
    log("measuring the matmul peak")
    shapes = gemm_shapes(settings, cfg)
    peaks_start = measure_peaks(settings, shapes)
    log(f"matmul peak: {json.dumps(peaks_start)}")

    results: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    model_info: dict[str, Any] = {}
    for dtype in settings.dtypes:
        model, _ = load_model(str(model_dir), dtype=dtype, device=settings.device)
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
        for dist in settings.distributions:
            seqs, requests, num_blocks = make_sequences(prompts[dist])
            runners = {
                backend: Runner(model, runner_config(backend, num_blocks, settings.seed))
                for backend in ("dense", "varlen")
            }
            for runner in runners.values():  # fault the pool's pages in now, not in a pass
                runner.kv_cache.k.fill_(0.0)
                runner.kv_cache.v.fill_(0.0)

            def runner_of(method: str, runners: dict[str, Runner] = runners) -> Runner:
                return runners["varlen" if method == "packed-varlen" else "dense"]

            gc.collect()
            gc.freeze()  # setup objects (token lists, model) leave gc's scans: gc.collect is fast
            # Warm-up: every method once on the first batch of the smallest batch size.
            warm = seqs[: settings.batch_sizes[0]]
            run_interleaved(runner_of, warm, requests, len(warm), 0, mem)
            timings: dict[tuple[int, str], list[Timing]] = {}
            block_start = time.perf_counter()
            loads.append({"dtype": dtype, "distribution": dist, "start": os.getloadavg()})
            for rep in range(settings.repeats):
                for bi, batch_size in enumerate(settings.batch_sizes):
                    passes = run_interleaved(runner_of, seqs, requests, batch_size, rep + bi, mem)
                    for method, t in passes.items():
                        timings.setdefault((batch_size, method), []).append(t)
                    log(
                        f"{dtype} {dist} rep {rep} B={batch_size}: "
                        + ", ".join(
                            f"{m} {t.seconds:.2f}s +{t.peak_rss_delta / 2**20:.0f}MiB"
                            for m, t in passes.items()
                        )
                        + f"; load {os.getloadavg()[0]:.1f}"
                    )
            loads[-1]["end"] = os.getloadavg()
            loads[-1]["seconds"] = time.perf_counter() - block_start
            results += summarize(
                model, model_info["non_embedding_params"], dtype, dist, seqs, settings, timings
            )
            del runners
            gc.unfreeze()
            gc.collect()
        del model
        gc.collect()

    log("measuring the matmul peak again")
    peaks_end = measure_peaks(settings, shapes)
    mem.stop()
    peaks = {
        name: max(*peaks_start[name].values(), *peaks_end[name].values())
        for name in settings.dtypes
    }
    for row in results:
        row["matmul_peak_gflops"] = peaks[row["dtype"]]
        row["peak_fraction"] = row["model_gflops"] / peaks[row["dtype"]]
    gpu = is_cuda(settings.device)
    report = {
        "settings": asdict(settings),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(),
            "device": settings.device,
            "gpu": torch.cuda.get_device_name(settings.device) if gpu else None,
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
                "clip": [MIN_LEN, settings.max_len],
                "lengths": [len(p) for p in prompts[dist]],
            }
            for dist in settings.distributions
        },
        "matmul": {
            "shapes_mkn": shapes,
            "reps": settings.matmul_reps,
            "start": peaks_start,
            "end": peaks_end,
            "peak_gflops": peaks,  # the best of every shape, start and end
        },
        "memory_method": (
            "GPU: per step, torch.cuda.max_memory_allocated() during the step minus "
            "memory_allocated() just before it (the KV pool is preallocated, so not counted); "
            "the max over steps and repeats is reported"
        )
        if gpu
        else (
            "a background thread reads this process's RSS from /proc/self/statm every ~1 ms "
            "(see rss_samples_per_s); per step, the peak RSS during the step minus the RSS "
            "just before it, after gc.collect() and glibc malloc_trim(0) (so memory freed "
            f"earlier is not silently reused; trim available: {malloc_trim}); the KV pool is "
            "preallocated and faulted in before timing, so it is not counted; the max over "
            "steps and repeats is reported"
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
    params: int,
    dtype: str,
    dist: str,
    seqs: list[ScheduledSequence],
    settings: Settings,
    timings: dict[tuple[int, str], list[Timing]],
) -> list[dict[str, Any]]:
    lengths = [s.num_tokens for s in seqs]
    real = sum(lengths)
    flops = model_flops(model, params, lengths)
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
                    "seconds_min": min(t.seconds for t in ts),
                    "cpu_utilization": statistics.median(t.cpu_seconds / t.seconds for t in ts),
                    "real_tokens": real,
                    "computed_tokens": computed_tokens(batches(seqs, method, batch_size)),
                    "tokens_per_s": real / seconds,
                    "speedup": padded_s / seconds,
                    "speedup_of_min": min(t.seconds for t in padded) / min(t.seconds for t in ts),
                    "token_ideal_speedup": padded_tokens / real,
                    "peak_rss_mib": max(t.peak_rss_delta for t in ts) / 2**20,
                    "rss_samples_per_s": statistics.median(t.rss_samples / t.sampled_s for t in ts),
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
        for dist in settings.distributions:
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
    sq = s["matmul_n"]

    def square(dtype: str, backend: str) -> float:
        return max(report["matmul"][w][dtype][f"square {sq} ({backend})"] for w in ("start", "end"))

    gpu = m.get("gpu")
    if gpu:
        where = f"GPU {gpu} (`{m['device']}`), host {m['cpu_model']}"
        peak_how = "torch.mm on the GPU"
        squares = {k: f"{sq}x{sq}: {square(k, 'torch.mm'):.0f}" for k in mm}
        backend_note = "The model's linear layers run as torch's nn.Linear (cuBLAS)."
        memory = "peak GPU memory growth (allocated bytes)"
    else:
        where = f"{m['cpu_model']}, {m['cores']} cores"
        peak_how = "torch.mm and of oneDNN with a prepacked operand"
        squares = {
            k: f"{sq}x{sq}: torch.mm {square(k, 'torch.mm'):.0f}, oneDNN {square(k, 'oneDNN'):.0f}"
            for k in mm
        }
        backend_note = "The model's linear layers run on oneDNN (`--linear-backend onednn`)."
        memory = "peak RSS growth"
    lines = [
        f"# Prefill: padded vs. packed ({report['date']})",
        "",
        f"{where}, torch {m['torch']}, transformers "
        f"{m['transformers']}; model `{report['model']['size']}` "
        f"({report['model']['params'] / 1e6:.0f}M params); {s['num_prompts']} prompts per "
        f"distribution, median of {s['repeats']} interleaved repeats; load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end.",
        f"Matmul peak (best of {report['matmul']['reps']} reps of {peak_how}, over square "
        f"{sq}/1024 and the model's GEMM shapes, at start and end): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s ({squares[k]})" for k, v in mm.items())
        + f". {backend_note}",
        "",
        "tok/s = real prompt tokens per second; x = speedup over padded; ideal = padded tokens "
        f"computed / real tokens; MiB = {memory}; % peak = model FLOP/s on real tokens / "
        "matmul peak. Methods: pad / sort / p-dense / p-varlen.",
        "",
        "| dtype | dist | B | tok/s pad | tok/s sort | tok/s p-dense | tok/s p-varlen "
        "| x sort | x p-dense | x p-varlen | ideal | MiB pad/sort/p-d/p-v "
        "| % peak pad/sort/p-d/p-v |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by = {
        (r["dtype"], r["distribution"], r["batch_size"], r["method"]): r for r in report["results"]
    }
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
            bad = [
                f"{c['dtype']}/{c['distribution']}/B={c['batch_size']}"
                for c in mine
                if not c["met"]
            ]
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
    by = {
        (r["dtype"], r["distribution"], r["batch_size"], r["method"]): r for r in report["results"]
    }
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
                ax.plot(
                    xs,
                    ys,
                    styles.get(dtype, "-"),
                    color=color,
                    marker="o",
                    label=f"{method} {dtype}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(b) for b in xs])
        ax.set_xlabel("batch size B (prompts per step)")
        ax.set_ylabel("speedup over padded (wall time)")
        lens = report["distributions"][dist]["lengths"]
        ax.set_title(f"{dist}: {len(lens)} prompts, median {int(np.median(lens))}, max {max(lens)}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    model = report["model"]["size"]
    where = report["machine"].get("gpu") or report["machine"]["cpu_model"]
    fig.suptitle(f"Prefill speedup over padded, {model} model, {where}")
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


PROFILE_CASES = (("float32", "wide"), ("bfloat16", "narrow"))


def run_profile(settings: Settings, out_dir: Path) -> None:
    """torch.profiler breakdown of the first step of every method, smallest B, for the cases
    in PROFILE_CASES. Writes <stem>.profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    from packserve.kernels.inputs import step_inputs

    model_dir = default_model_dir(settings.model_size)
    cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
    shapes = gemm_shapes(settings, cfg)
    b = settings.batch_sizes[0]
    out = [f"load average at start {os.getloadavg()}\n"]
    for dtype, dist in PROFILE_CASES:
        model, tokenizer = load_model(str(model_dir), dtype=dtype)
        params = non_embedding_params(model)
        docs = corpus_token_windows(tokenizer)
        prompts = seeded_prompts(docs, tokenizer, settings, dist)
        seqs, requests, num_blocks = make_sequences(prompts)
        gemms = measure_peaks(Settings(**(asdict(settings) | {"dtypes": (dtype,)})), shapes)
        peak = max(gemms[dtype].values())
        out.append(
            f"\n######## {dtype}, {dist}, B={b}, first batch; torch.mm GFLOP/s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in gemms[dtype].items())
            + "\n"
        )
        for method in METHODS:
            backend = "varlen" if method == "packed-varlen" else "dense"
            runner = Runner(model, runner_config(backend, num_blocks, seed=0))
            bins = batches(seqs, method, b)[0]
            step = prefill_step(bins, requests)
            runner.execute(step, torch.get_num_threads())
            start = time.perf_counter()
            runner.execute(step, torch.get_num_threads())
            wall = time.perf_counter() - start
            start = time.perf_counter()
            tables = {r: list(req.block_ids) for r, req in requests.items()}
            step_inputs(bins, tables, runner.kv_cache, backend, model.dtype)
            inputs_s = time.perf_counter() - start
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.execute(step, torch.get_num_threads())
            events = prof.key_averages()
            per_cat: dict[str, float] = {}
            for ev in events:
                cat = category(ev.key)
                per_cat[cat] = per_cat.get(cat, 0.0) + ev.self_cpu_time_total / 1e6
            total = sum(per_cat.values())
            lengths = [s.num_tokens for row in bins for s in row]
            flops = model_flops(model, params, lengths)
            rows = len(bins)
            row_len = max(sum(s.num_tokens for s in row) for row in bins)
            # GEMM work actually done: every computed (padded) token, plus the lm head.
            gemm_flops = 2 * params * rows * row_len
            gemm_flops += 2 * cfg.hidden_size * cfg.vocab_size * len(lengths)
            gemm_s = per_cat.get("gemm", 0.0)
            out.append(
                f"\n== {method}: {rows} rows x {row_len} tokens ({sum(lengths)} real, "
                f"{len(lengths)} prompts); unprofiled wall {wall:.2f}s = "
                f"{sum(lengths) / wall:.0f} tok/s, model {flops / wall / 1e9:.0f} GFLOP/s = "
                f"{100 * flops / wall / 1e9 / peak:.0f}% of peak; step_inputs {inputs_s:.3f}s; "
                f"profiled self-CPU total {total:.2f}s\n"
            )
            for cat, sec in sorted(per_cat.items(), key=lambda kv: -kv[1]):
                out.append(f"  {cat:22s} {sec:7.2f}s  {100 * sec / total:5.1f}%\n")
            if gemm_s:
                out.append(
                    f"  GEMMs: {gemm_flops / gemm_s / 1e9:.0f} GFLOP/s on the tokens computed "
                    f"({100 * gemm_flops / gemm_s / 1e9 / peak:.0f}% of peak)\n"
                )
            out.append(events.table(sort_by="self_cpu_time_total", row_limit=14) + "\n")
            log(f"profiled {dtype} {dist} {method}: {wall:.2f}s")
            del runner
        del model
        gc.collect()
    out.append(f"\nload average at end {os.getloadavg()}\n")
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
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    parser.add_argument("--dtypes", help="comma-separated subset, e.g. float32,bfloat16")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes, e.g. 16,32,64")
    parser.add_argument(
        "--distributions", help=f"comma-separated subset of {','.join(DISTRIBUTIONS)}"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.prompts:
        overrides["num_prompts"] = args.prompts
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.device != "cpu":
        overrides["device"] = args.device
    if args.dtypes:
        overrides["dtypes"] = tuple(args.dtypes.split(","))
    if args.batch_sizes:
        overrides["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(","))
    if args.distributions:
        unknown = set(args.distributions.split(",")) - set(DISTRIBUTIONS)
        if unknown:
            parser.error(f"unknown distributions {sorted(unknown)}")
        overrides["distributions"] = tuple(args.distributions.split(","))
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
