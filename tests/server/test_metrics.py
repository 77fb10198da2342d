"""/metrics: parseable Prometheus text, every series of server/metrics.py with a model_name
label, and counters that move by exactly what one request did."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from packserve.server.metrics import Metrics

P = "packserve:"
EXPECTED = {  # the vLLM-compatible names dashboards and autoscalers rely on
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge",
    "prompt_tokens": "counter",
    "generation_tokens": "counter",
    "request_success": "counter",
    "num_preemptions": "counter",
    "prefix_cache_queries": "counter",
    "prefix_cache_hits": "counter",
    "prefill_rows": "counter",
    "prefill_tokens_real": "counter",
    "prefill_tokens_padded": "counter",
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram",
    "iteration_tokens_total": "histogram",
    "prefill_bin_fill_ratio": "histogram",
    "kernel_info": "gauge",  # value 1, the resolved kernels as labels
    "engine_threads": "gauge",  # intra-op threads of the last step
}
PROMPT = "Metrics probe: count these tokens please"
M = 7


def _families(url: str) -> dict[str, object]:
    r = httpx.get(url + "/metrics", timeout=30.0)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


@pytest.fixture
def completion(http, parse_sse):
    """Run one greedy request of exactly M tokens (ignore_eos); returns its usage."""

    def run(stream: bool = False) -> dict:
        body = {"prompt": PROMPT, "max_tokens": M, "temperature": 0, "ignore_eos": True}
        if not stream:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = parse_sse(list(r.iter_lines()))
        assert events[-1] == "[DONE]"
        return events[-2]["usage"]

    return run


def test_metrics_parse_and_every_series_is_labelled(base_url, http, model_name, settle):
    http.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 2})
    settle(base_url)
    families = _families(base_url)
    ours = {name for name in families if name.startswith(P)}
    for short, kind in EXPECTED.items():
        name = P + short
        assert name in families, f"{name} missing; have {sorted(ours)}"
        family = families[name]
        assert family.type == kind, (name, family.type)
        assert family.documentation, name
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            assert sample.labels.get("model_name") == model_name, sample
    # everything server/metrics.py registers is exported (nothing renamed or forgotten)
    registered = {f.name for f in Metrics(model_name).registry.collect()}
    assert registered <= set(families), registered - set(families)
    assert {P + n for n in EXPECTED} <= registered
    reasons = {s.labels["finished_reason"] for s in families[P + "request_success"].samples}
    assert "length" in reasons


def _delta(before: dict, after: dict, metric, name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_counters_move_by_one_request(
    base_url, tokenizer, metrics, metric, settle, completion, stream
):
    n_prompt = len(tokenizer(PROMPT).input_ids)
    settle(base_url)
    before = metrics(base_url)
    usage = completion(stream=stream)
    assert usage["prompt_tokens"] == n_prompt
    assert usage["completion_tokens"] == M
    cached = usage["prompt_tokens_details"]["cached_tokens"]  # the other run may have left some
    settle(base_url)  # bounded; normally already idle
    after = metrics(base_url)

    def d(name: str, **labels: str) -> float:
        return _delta(before, after, metric, P + name, **labels)

    assert d("prompt_tokens_total") == n_prompt
    assert d("generation_tokens_total") == M
    assert d("request_success_total", finished_reason="length") == 1
    assert d("request_success_total", finished_reason="stop") == 0
    assert d("request_success_total", finished_reason="abort") == 0
    assert d("prefix_cache_queries_total") >= n_prompt  # each admission looks its prompt up
    assert d("prefix_cache_hits_total") == cached
    # The packed rows: the uncached prompt and, mixed in, decode tokens (each a segment).
    real = d("prefill_tokens_real_total")
    assert n_prompt - cached <= real <= n_prompt - cached + M - 1
    assert d("prefill_tokens_padded_total") >= real
    assert 1 <= d("prefill_rows_total") <= M
    assert d("num_preemptions_total") == 0
    assert d("e2e_request_latency_seconds_count") == 1
    assert d("e2e_request_latency_seconds_sum") > 0
    assert d("time_to_first_token_seconds_count") == 1
    assert d("request_queue_time_seconds_count") == 1
    assert d("request_prompt_tokens_count") == 1
    assert d("request_prompt_tokens_sum") == n_prompt
    assert d("request_generation_tokens_count") == 1
    assert d("request_generation_tokens_sum") == M
    assert d("inter_token_latency_seconds_count") == M - 1
    # one step prefills the prompt (and samples token 1), M - 1 steps decode one token each
    assert d("iteration_tokens_total_count") == M
    assert d("iteration_tokens_total_sum") == n_prompt - cached + M - 1
    # one fill per step that ran packed rows, every step of one sequence
    assert d("prefill_bin_fill_ratio_count") == d("prefill_rows_total")
    # the histograms' +Inf buckets agree with their counts
    assert d("e2e_request_latency_seconds_bucket", le="+Inf") == 1
    assert metric(after, P + "num_requests_running") == 0
    assert metric(after, P + "num_requests_waiting") == 0
    assert metric(after, P + "kv_cache_usage_perc") == 0


def test_stop_string_is_counted_as_stop(base_url, http, metrics, metric, settle, offline):
    text = offline(PROMPT, 16, ignore_eos=True).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    settle(base_url)
    before = metrics(base_url)
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stop": stop}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    settle(base_url)
    after = metrics(base_url)
    tokens = r.json()["usage"]["completion_tokens"]
    assert _delta(before, after, metric, P + "request_success_total", finished_reason="stop") == 1
    assert _delta(before, after, metric, P + "request_success_total", finished_reason="length") == 0
    assert _delta(before, after, metric, P + "generation_tokens_total") == tokens


def test_n_and_prompt_lists_count_every_choice(base_url, http, tokenizer, metrics, metric, settle):
    prompts = ["first metrics prompt", "second one"]
    body = {
        "prompt": prompts,
        "n": 2,
        "max_tokens": 3,
        "temperature": 0.5,
        "seed": 1,
        "ignore_eos": True,
    }
    settle(base_url)
    before = metrics(base_url)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    settle(base_url)
    after = metrics(base_url)
    n_prompt = sum(len(tokenizer(p).input_ids) for p in prompts)
    assert r.json()["usage"]["prompt_tokens"] == n_prompt
    # four sequences ran: each prefilled its prompt and made 3 tokens
    assert _delta(before, after, metric, P + "generation_tokens_total") == 12
    assert _delta(before, after, metric, P + "request_success_total", finished_reason="length") == 4
    assert _delta(before, after, metric, P + "prompt_tokens_total") == 2 * n_prompt
    # the rows hold both prompts twice (n = 2) and, at most, the 4 x 2 decode tokens
    real = _delta(before, after, metric, P + "prefill_tokens_real_total")
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 0  # prompts shorter than a block
    assert 2 * n_prompt <= real <= 2 * n_prompt + 8
    assert _delta(before, after, metric, P + "prefix_cache_queries_total") >= 2 * n_prompt
    assert _delta(before, after, metric, P + "e2e_request_latency_seconds_count") == 4


def test_prefix_cache_counters_move_by_the_reported_amounts(
    base_url, http, metrics, metric, settle
):
    """A prompt of several blocks sent twice: queries count both admissions' prompt tokens,
    hits exactly what the second response reports as cached."""
    prompt = list(range(300, 300 + 200))  # token ids of no other test
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    settle(base_url)
    before = metrics(base_url)
    usages = []
    for _ in range(2):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    settle(base_url)
    after = metrics(base_url)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert cached[0] == 0 and cached[1] > 0

    def d(name: str) -> float:
        return _delta(before, after, metric, P + name)

    assert d("prefix_cache_hits_total") == sum(cached)
    assert d("prefix_cache_queries_total") >= 2 * len(prompt)
    assert d("prompt_tokens_total") == 2 * len(prompt)  # cached or not, a prompt token counts
    # what ran: the first prompt whole, the second's uncached rest, one decode each
    assert d("iteration_tokens_total_sum") == 2 * len(prompt) - cached[1] + 2
