"""Prometheus metrics, named after vLLM's so existing dashboards and autoscalers work.

The only module that imports prometheus_client. The engine reports plain StepStats; request
timings come from the HTTP handlers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from packserve.engine import EngineInfo, EngineLoad, StepStats

PREFIX = "packserve:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """One finished request, as the handler saw it (seconds, perf_counter clock)."""

    arrival: float
    scheduled: float | None  # start of the step that produced its first token
    first_token: float | None
    finished: float
    token_times: tuple[float, ...]  # when each delta with tokens arrived
    num_prompt_tokens: int
    num_generation_tokens: int
    finish_reason: str


class Metrics:
    """All series of one server, in a registry of its own (several servers per test process)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels + list(extra), registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Requests in the decode batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be admitted.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).")
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.success = counter("request_success_total", "Finished requests.", ("finished_reason",))
        self.preemptions = counter("num_preemptions_total", "Sequences preempted.")
        self.prefix_queries = counter(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache (on admission).",
        )
        self.prefix_hits = counter(
            "prefix_cache_hits_total", "Prompt tokens found in the prefix cache."
        )
        # The packed forward's rows hold prompt pieces and, mixed in, decode tokens: real and
        # padded count the same rows, so their ratio is the rows' fill.
        self.prefill_rows = counter("prefill_rows_total", "Packed forward rows run.")
        self.prefill_real = counter(
            "prefill_tokens_real_total",
            "Real tokens of the packed rows (prompt pieces and decode tokens mixed in).",
        )
        self.prefill_padded = counter(
            "prefill_tokens_padded_total",
            "Tokens the packed rows computed, padding included.",
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS
        )
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens.", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency.", LATENCY_BUCKETS)
        self.queue = histogram(
            "request_queue_time_seconds", "Time waiting to be scheduled.", LATENCY_BUCKETS
        )
        self.req_prompt = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS
        )
        self.req_generation = histogram(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens computed per engine step.", TOKEN_BUCKETS
        )
        self.bin_fill = histogram(
            "prefill_bin_fill_ratio",
            "Real over computed tokens of each step's packed rows.",
            FILL_BUCKETS,
        )
        # An info metric (value 1): the kernels this server runs, as resolved at start-up.
        self.kernel_info = Gauge(
            PREFIX + "kernel_info",
            "Kernels in use (value 1): dtype, linear backend, decode attention, quantization, "
            "intra-op threads (the most a step runs on).",
            [*labels, "dtype", "linear_backend", "decode_attention", "quantization", "threads"],
            registry=r,
        )
        self.engine_threads = Gauge(
            PREFIX + "engine_threads",
            "Intra-op threads the last engine step ran on.",
            labels,
            registry=r,
        )
        # vLLM's LoRA info metric: one series, its labels the adapters in use now, its value
        # the time it was read (set at scrape time).
        self.lora_info = Gauge(
            PREFIX + "lora_requests_info",
            "Running stats on LoRA requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=r,
        )
        self.lora_loads = counter("lora_loads_total", "LoRA adapters copied into the pool.")
        self.lora_evictions = counter(
            "lora_evictions_total", "LoRA adapters evicted from the pool to make room."
        )
        self._load: Callable[[], EngineLoad] | None = None
        self._max_loras = 0
        self._lora_counted = (0, 0)  # the engine's load and eviction totals counted so far
        self.model_name = model_name
        # Every series exists from the start (at 0), so scrapers and autoscalers see it.
        for child in (
            self.running,
            self.waiting,
            self.kv_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
            self.prefix_queries,
            self.prefix_hits,
            self.prefill_rows,
            self.prefill_real,
            self.prefill_padded,
            self.ttft,
            self.itl,
            self.e2e,
            self.queue,
            self.req_prompt,
            self.req_generation,
            self.iteration_tokens,
            self.bin_fill,
            self.lora_loads,
            self.lora_evictions,
        ):
            child.labels(model_name)
        for reason in ("stop", "length", "abort", "error"):
            self.success.labels(model_name, reason)

    def track(self, load: Callable[[], EngineLoad], num_waiting: Callable[[], int]) -> None:
        """Read the gauges at scrape time from the engine's latest published load, so they
        are current also after an abort or while the engine idles. `num_waiting` also counts
        requests submitted but not yet taken in by the engine thread."""
        m = self.model_name
        self.running.labels(m).set_function(lambda: load().num_running)
        self.waiting.labels(m).set_function(num_waiting)
        self.kv_usage.labels(m).set_function(lambda: load().kv_cache_usage)
        self._load = load

    def set_kernel_info(self, info: EngineInfo) -> None:
        """Called once the engine is loaded: what its `auto` choices resolved to."""
        self.kernel_info.labels(
            self.model_name,
            info.dtype,
            info.linear_backend,
            info.decode_attention,
            info.quantization,
            str(info.threads),
        ).set(1)
        self._max_loras = info.max_loras

    def observe_step(self, stats: StepStats) -> None:
        """Called by the engine thread after every step: the work counters."""
        m = self.model_name
        self.preemptions.labels(m).inc(stats.num_preempted)
        self.iteration_tokens.labels(m).observe(stats.num_tokens)
        self.prefix_queries.labels(m).inc(stats.num_cache_query_tokens)
        self.prefix_hits.labels(m).inc(stats.num_cache_hit_tokens)
        if stats.threads:
            self.engine_threads.labels(m).set(stats.threads)
        if stats.num_prefill_rows:
            self.prefill_rows.labels(m).inc(stats.num_prefill_rows)
            self.prefill_real.labels(m).inc(stats.num_row_tokens)
            self.prefill_padded.labels(m).inc(stats.num_padded_prefill_tokens)
            self.bin_fill.labels(m).observe(stats.bin_fill)

    def count_tokens(self, prompt: int, generation: int) -> None:
        """Called by a handler as its request's tokens arrive: the prompt once, when the first
        token does (recompute after a preemption is not counted again)."""
        if prompt:
            self.prompt_tokens.labels(self.model_name).inc(prompt)
        if generation:
            self.generation_tokens.labels(self.model_name).inc(generation)

    def observe_request(self, t: RequestTimings) -> None:
        """Called by a handler when its request finished (any reason)."""
        m = self.model_name
        self.success.labels(m, t.finish_reason).inc()
        self.e2e.labels(m).observe(t.finished - t.arrival)
        self.req_prompt.labels(m).observe(t.num_prompt_tokens)
        self.req_generation.labels(m).observe(t.num_generation_tokens)
        if t.scheduled is not None:
            self.queue.labels(m).observe(max(0.0, t.scheduled - t.arrival))
        if t.first_token is not None:
            self.ttft.labels(m).observe(t.first_token - t.arrival)
        for a, b in zip(t.token_times, t.token_times[1:], strict=False):
            self.itl.labels(m).observe(b - a)

    def render(self) -> bytes:
        if self._load is not None and self._max_loras:
            self._read_lora(self._load())
        return generate_latest(self.registry)

    def _read_lora(self, load: EngineLoad) -> None:
        """Bring the LoRA series up to the engine's latest load (at scrape time)."""
        m = self.model_name
        self.lora_info.clear()
        self.lora_info.labels(
            str(self._max_loras), ",".join(load.waiting_adapters), ",".join(load.running_adapters)
        ).set(time.time())
        loads, evictions = load.num_lora_loads_total, load.num_lora_evictions_total
        self.lora_loads.labels(m).inc(loads - self._lora_counted[0])
        self.lora_evictions.labels(m).inc(evictions - self._lora_counted[1])
        self._lora_counted = (loads, evictions)
