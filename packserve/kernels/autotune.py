"""`--linear-backend auto` and `--decode-attention auto`: the faster kernel for this model on
this machine, measured.

Which GEMM wins depends on the CPU (oneDNN with a prepacked weight was 2.4x MKL's float32 on
an AMD EPYC, no faster on an Intel Xeon with AMX), the dtype and the shapes. So the choice
is timed once, on the model's own layer shapes, and cached per (CPU model, torch version,
dtype, threads, shapes) in the model cache folder; later starts read it.

The timed workload is what `pack_linears` would swap: each decoder layer shape at decode
sizes (16 and 64 rows) and a prefill size (512), the LM head at decode sizes only (it sees
the sampled rows alone). Each (shape, rows) is run torch then oneDNN, alternately, in rounds
until a time budget is spent; a shape's time is its best run (a shared machine's other jobs
only ever add time). The score of oneDNN is the geometric mean over row counts of its
summed time over torch's; below 1 it wins.

Decode attention is timed the same way on a few decode batches over a KV pool of the model's
heads, as the engine runs them: in length buckets, gathering each bucket's contexts
(`KVCache.gather`) and attending one token each through torch's fused SDPA kernel or through
two batched matmuls (`attention.matmul_decode`), and through the paged kernel reading the
pool in place (kernels/native.py) where it builds. Only on a CPU: other devices keep the fused
kernel.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from packserve.scheduler import ScheduledSequence

from .attention import DecodeAttention, PagedDecode
from .choices import DecodeKernel, LinearBackend
from .inputs import decode_attention, paged_decode
from .kv_cache import KVCache, KVCacheSpec
from .linear import MIN_WEIGHT_ELEMENTS, can_pack, pack_weight, packed_linear
from .machine import cpu_model
from .native import build as build_native

DECODE_ROWS = (16, 64)
PREFILL_ROWS = 512
# (sequences, longest context): each a decode batch, contexts spread down to an eighth of it
DECODE_ATTENTION_SIZES = ((64, 512), (16, 2048), (4, 4096))
BUDGET_S = 1.5  # timing rounds stop once this is spent (at least MIN_ROUNDS)
MIN_ROUNDS, MAX_ROUNDS = 3, 20
CACHE_VERSION = 2  # bump when the measurement changes, so older choices are not reused

ChoiceSource = Literal["flag", "measured", "cached", "unpackable"]
# flag: given; measured / cached: as above; fixed: not timed off the CPU, nor in batch-invariant
# mode (whose bitwise contract holds for the fused kernel on one thread)
DecodeChoiceSource = Literal["flag", "measured", "cached", "fixed"]


@dataclass(frozen=True, slots=True)
class LinearChoice:
    """The linear backend a runner uses and how it was decided."""

    backend: LinearBackend
    # flag: given; measured: timed now (and cached); cached: read from an earlier timing;
    # unpackable: oneDNN cannot take this model (device, dtype) or it has no layer to pack
    source: ChoiceSource
    onednn_over_torch: float | None  # the measured score (measured / cached only)
    cache_path: Path | None  # where the choice is cached (measured / cached only)


@dataclass(frozen=True, slots=True)
class DecodeChoice:
    """The decode attention kernel a runner uses and how it was decided."""

    kernel: DecodeKernel
    source: DecodeChoiceSource
    # each timed kernel's time over the fused kernel's (measured / cached only)
    over_sdpa: dict[str, float] | None
    cache_path: Path | None


@dataclass(frozen=True, slots=True)
class Workload:
    """One layer shape as the model runs it: `count` layers of [out, in] at `rows` rows."""

    out_features: int
    in_features: int
    count: int
    rows: tuple[int, ...]


def linear_workload(model: PreTrainedModel) -> list[Workload]:
    """The shapes `pack_linears` would swap, counted, with the row counts each runs at."""
    head = model.get_output_embeddings()
    counts: dict[tuple[int, int, bool], int] = {}
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.numel() >= MIN_WEIGHT_ELEMENTS:
            key = (module.out_features, module.in_features, module is head)
            counts[key] = counts.get(key, 0) + 1
    return [
        Workload(out, inp, n, DECODE_ROWS if is_head else (*DECODE_ROWS, PREFILL_ROWS))
        for (out, inp, is_head), n in sorted(counts.items())
    ]


def choose_linear_backend(model: PreTrainedModel, cache_dir: Path | None) -> LinearChoice:
    """The cached choice for this model's shapes on this machine, else a timed one (cached
    into `cache_dir` when given)."""
    workload = linear_workload(model)
    if not can_pack(model) or not workload:
        return LinearChoice("torch", "unpackable", None, None)
    dtype = next(model.parameters()).dtype
    key = {
        "version": CACHE_VERSION,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "shapes": [[w.out_features, w.in_features, w.count, list(w.rows)] for w in workload],
    }
    path = _cache_path(cache_dir, "linear", key)
    cached = _score(_read(path, key, "onednn_over_torch"))
    if cached is not None:
        return LinearChoice(_winner(cached), "cached", cached, path)
    score = time_onednn_over_torch(model, workload)
    _write(path, {**key, "onednn_over_torch": score})
    return LinearChoice(_winner(score), "measured", score, path)


def choose_decode_kernel(
    spec: KVCacheSpec, num_heads: int, device: torch.device, cache_dir: Path | None
) -> DecodeChoice:
    """The cached decode attention kernel for these heads on this machine, else a timed one
    (cached into `cache_dir` when given). Off the CPU: the fused kernel, untimed. The paged
    kernel is timed where it builds (kernels/native.py)."""
    if device.type != "cpu":
        return DecodeChoice("sdpa", "fixed", None, None)
    native = build_native()
    kernels: list[DecodeKernel] = ["matmul", "paged"] if native.kernels else ["matmul"]
    key = {
        "version": CACHE_VERSION,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "heads": [num_heads, spec.num_kv_heads, spec.head_dim],
        "block_size": spec.block_size,
        "sizes": [list(size) for size in DECODE_ATTENTION_SIZES],
        "kernels": kernels,
        "native_build": native.name if native.kernels else None,
    }
    path = _cache_path(cache_dir, "decode-attention", key)
    record = _read(path, key, "over_sdpa")
    cached = (
        {name: _score(record.get(name)) for name in kernels} if isinstance(record, dict) else {}
    )
    over_sdpa: dict[str, float] = {n: score for n, score in cached.items() if score is not None}
    source: DecodeChoiceSource = "cached"
    if len(over_sdpa) < len(kernels):
        over_sdpa = time_decode_kernels(spec, num_heads, kernels)
        _write(path, {**key, "over_sdpa": over_sdpa})
        source = "measured"
    fastest = min(kernels, key=over_sdpa.__getitem__)
    kernel: DecodeKernel = fastest if over_sdpa[fastest] < 1 else "sdpa"
    return DecodeChoice(kernel, source, over_sdpa, path)


def time_decode_kernels(
    spec: KVCacheSpec, num_heads: int, kernels: list[DecodeKernel]
) -> dict[str, float]:
    """Each kernel's time over the fused kernel's: the geometric mean over
    `DECODE_ATTENTION_SIZES` of each one's best time. A size is a decode batch whose contexts
    spread evenly from its context length down to an eighth of it, in blocks scattered
    through a pool, attended as the engine attends it (`inputs.paged_decode`, or
    `inputs.decode_attention`'s length buckets, gathering included)."""
    generator = torch.Generator().manual_seed(0)
    block = spec.block_size
    cases: list[list[Callable[[], object]]] = []
    for sequences, context in DECODE_ATTENTION_SIZES:
        lengths = torch.linspace(context, context // 8, sequences).long().tolist()
        widths = [-(-n // block) for n in lengths]
        pool = KVCache(replace(spec, num_layers=1), sum(widths), torch.device("cpu"))
        pool.k.copy_(torch.randn(pool.k.shape, generator=generator))
        pool.v.copy_(torch.randn(pool.v.shape, generator=generator))
        order = torch.randperm(sum(widths), generator=generator).tolist()  # scattered blocks
        tables = {str(i): order[sum(widths[:i]) : sum(widths[: i + 1])] for i in range(sequences)}
        singles = [
            (i, ScheduledSequence(str(i), (0,), n - 1, (), True, True))
            for i, n in enumerate(lengths)
        ]
        q = torch.randn(sequences, num_heads, spec.head_dim, generator=generator).to(spec.dtype)
        out = torch.empty_like(q)
        decodes: list[DecodeAttention | PagedDecode] = [
            decode_attention(singles, tables, pool, spec.dtype, 0, "sdpa")
        ]
        for name in kernels:
            if name == "paged":
                decodes.append(paged_decode(singles, tables, pool))
            else:
                decodes.append(decode_attention(singles, tables, pool, spec.dtype, 0, name))
        scale = spec.head_dim**-0.5
        cases.append([partial(decode.attend, pool, 0, q, out, scale) for decode in decodes])
    times = _best_times(cases)
    return {
        name: math.exp(sum(math.log(t[i + 1] / t[0]) for t in times) / len(times))
        for i, name in enumerate(kernels)
    }


def time_onednn_over_torch(model: nn.Module, workload: list[Workload]) -> float:
    """oneDNN's time over torch's on `workload`: the geometric mean over row counts of each
    one's summed best times."""
    weights = {
        (m.out_features, m.in_features): m.weight.detach()
        for m in model.modules()
        if type(m) is nn.Linear
    }
    cases: list[tuple[int, int, list[Callable[[], object]]]] = []  # (rows, count, [torch, dnn])
    for w in workload:
        weight = weights[(w.out_features, w.in_features)]
        packed = pack_weight(weight)
        for rows in w.rows:
            x = torch.randn(rows, w.in_features, dtype=weight.dtype, device=weight.device)
            calls: list[Callable[[], object]] = [
                partial(F.linear, x, weight),
                partial(packed_linear, x, packed),
            ]
            cases.append((rows, w.count, calls))
    best = _best_times([calls for _, _, calls in cases])
    totals: dict[int, list[float]] = {}  # rows -> [torch, onednn] summed over layers
    for (rows, count, _), times in zip(cases, best, strict=True):
        total = totals.setdefault(rows, [0.0, 0.0])
        total[0] += count * times[0]
        total[1] += count * times[1]
    ratios = [dnn / torch_time for torch_time, dnn in totals.values()]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _best_times(cases: list[list[Callable[[], object]]]) -> list[list[float]]:
    """Each case's calls, alternately, in rounds until the budget is spent: every call's best
    time (a shared machine's other jobs only ever add time)."""
    best = [[math.inf] * len(calls) for calls in cases]
    with torch.inference_mode():
        for calls in cases:  # warm up: first calls allocate and pick kernels
            for call in calls:
                call()
        deadline = time.perf_counter() + BUDGET_S
        for round_index in range(MAX_ROUNDS):
            if round_index >= MIN_ROUNDS and time.perf_counter() > deadline:
                break
            for calls, times in zip(cases, best, strict=True):
                for i, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    times[i] = min(times[i], time.perf_counter() - start)
    return best


def _winner(onednn_over_torch: float) -> LinearBackend:
    return "onednn" if onednn_over_torch < 1 else "torch"


def _cache_path(cache_dir: Path | None, kind: str, key: dict[str, object]) -> Path | None:
    if cache_dir is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{kind}-{digest[:16]}.json"


def _read(path: Path | None, key: dict[str, object], field: str) -> object:
    """The cached `field` for `key`, or None (no cache, unreadable, another key)."""
    if path is None:
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in key.items()):
        return None
    return record.get(field)


def _score(value: object) -> float | None:
    """A cached score: a positive number, else None."""
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _write(path: Path | None, record: dict[str, object]) -> None:
    """Write atomically (servers starting at once may race); a cache that cannot be written
    only costs the next start its timing."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
