"""What the dashboard costs the engine: the recorder's per-step time against the step's own.

Runs the real engine on the built-in tiny model (CPU) with a wave workload like the
dashboard tests' (prompts of 4..200 tokens, rows of 256, up to 16 running), times every
`Engine.step()` and, separately, what the server does after it on the engine thread: publish
the `EngineLoad` snapshot (`Engine.load()`) and call `DashboardRecorder.observe_step`. Then
the worst case on its own: a load with 256 running requests built and recorded on every
call. The feed's cost is off the engine thread; it is timed too, for scale.

Usage: .venv/bin/python -m bench.dashboard_overhead [--steps N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

from packserve.engine import Engine, EngineConfig, EngineLoad, RunningRequest, StepStats
from packserve.models.model_maker import default_model_dir
from packserve.scheduler import SamplingParams
from packserve.server.dashboard import DashboardRecorder


def engine_run(steps: int, seed: int = 0) -> dict[str, float]:
    engine = Engine(
        EngineConfig(
            model=str(default_model_dir("tiny")),
            max_model_len=256,
            max_num_batched_tokens=512,
            max_num_seqs=16,
            seed=seed,
        )
    )
    recorder = DashboardRecorder()
    rng = random.Random(seed)
    step_s: list[float] = []
    record_s: list[float] = []
    prefill_record_s: list[float] = []
    warmup = 20
    while len(step_s) < steps + warmup:
        if not engine.has_unfinished or rng.random() < 0.04:  # a wave of 12 prompts
            for _ in range(12):
                n = rng.choice([rng.randint(4, 40), rng.randint(30, 120), rng.randint(100, 200)])
                prompt = [rng.randrange(16, 8000) for _ in range(n)]
                engine.add_request(prompt, SamplingParams(max_tokens=rng.randint(16, 48)))
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        stats = engine.last_stats
        assert stats is not None
        recorder.observe_step(stats, engine.load())
        t2 = time.perf_counter()
        step_s.append(t1 - t0)
        record_s.append(t2 - t1)
        if stats.prefill_rows:
            prefill_record_s.append(t2 - t1)
    step_s, record_s = step_s[warmup:], record_s[warmup:]
    t0 = time.perf_counter()
    for _ in range(100):
        json.dumps(recorder.feed())
    feed_s = (time.perf_counter() - t0) / 100
    return {
        "steps": len(step_s),
        "step_ms_mean": 1e3 * statistics.fmean(step_s),
        "step_ms_median": 1e3 * statistics.median(step_s),
        "recorder_us_mean": 1e6 * statistics.fmean(record_s),
        "recorder_us_median": 1e6 * statistics.median(record_s),
        "recorder_us_p99": 1e6 * sorted(record_s)[int(0.99 * (len(record_s) - 1))],
        "recorder_us_prefill_steps_mean": 1e6 * statistics.fmean(prefill_record_s or [0.0]),
        "overhead_ratio": sum(record_s) / sum(step_s),
        # Pessimistic: a typical recorder call against the fastest tenth of the steps.
        "overhead_ratio_vs_fast_steps": statistics.median(record_s)
        / sorted(step_s)[len(step_s) // 10],
        "step_ms_p10": 1e3 * sorted(step_s)[len(step_s) // 10],
        "feed_ms_with_json": 1e3 * feed_s,
    }


def worst_case(calls: int = 20_000) -> dict[str, float]:
    """A load of 256 running requests built and recorded on every call, with a prefill of 16
    prompts; and the recorder alone with that load prebuilt."""
    stats = StepStats(
        prefill_rows=((100, 80, 60), (120, 90), (200,), (50,) * 4, (30,) * 6),
        num_prefill_tokens=1000,
        num_decode_tokens=256,
        num_sampled_tokens=256 + 16,
        num_cache_query_tokens=1000,
        num_cache_hit_tokens=0,
        num_preempted=0,
        step_time_s=0.05,
    )
    running = [(f"req-{i}", 100, i % 50, 0.0) for i in range(256)]

    def load() -> EngineLoad:
        table = tuple(RunningRequest(*r) for r in running)
        return EngineLoad(256, 10, 500, 1000, table)

    recorder = DashboardRecorder()
    t0 = time.perf_counter()
    for _ in range(calls):
        recorder.observe_step(stats, load())
    built_us = 1e6 * (time.perf_counter() - t0) / calls
    prebuilt = load()
    t0 = time.perf_counter()
    for _ in range(calls):
        recorder.observe_step(stats, prebuilt)
    recorder_us = 1e6 * (time.perf_counter() - t0) / calls
    return {"load_256_and_recorder_us": built_us, "recorder_only_us": recorder_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        **engine_run(args.steps),
        **worst_case(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"tiny model, CPU, {result['steps']} steps ({result['machine']})")
    print(
        f"engine step:        mean {result['step_ms_mean']:.2f} ms, "
        f"median {result['step_ms_median']:.2f} ms"
    )
    print(
        f"load + recorder:    mean {result['recorder_us_mean']:.1f} us, "
        f"median {result['recorder_us_median']:.1f} us, p99 {result['recorder_us_p99']:.1f} us "
        f"(prefill steps: mean {result['recorder_us_prefill_steps_mean']:.1f} us)"
    )
    print(
        f"overhead ratio:     {100 * result['overhead_ratio']:.3f}% of engine step time "
        f"(median call vs the fastest 10% of steps, {result['step_ms_p10']:.1f} ms: "
        f"{100 * result['overhead_ratio_vs_fast_steps']:.2f}%)"
    )
    print(
        f"worst case:         {result['load_256_and_recorder_us']:.1f} us building a "
        f"256-request load and recording it, {result['recorder_only_us']:.1f} us recording only"
    )
    print(f"feed (event loop):  {result['feed_ms_with_json']:.2f} ms per poll incl. JSON")


if __name__ == "__main__":
    main()
