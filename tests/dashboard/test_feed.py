"""The dashboard feed without a browser: the recorder on its own (bounds, arithmetic, `since`,
the running snapshot, TTFT percentiles), then the real server's feed under load (JSON shape,
no prompt text, open like /metrics while /v1 needs the key, no external resources)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from packserve.engine import EngineInfo, EngineLoad, RunningRequest, StepStats
from packserve.server.dashboard import (
    MAX_RUNNING_ROWS,
    TTFT_SAMPLES,
    DashboardRecorder,
)
from packserve.server.metrics import RequestTimings


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def stats(
    rows: tuple[tuple[int, ...], ...] = (),
    decode: int = 0,
    prompt: int | None = None,
    sampled: int | None = None,
    queries: int = 0,
    hits: int = 0,
) -> StepStats:
    """A step's figures. By default its rows are prompt pieces, each the prompt's last (so
    each samples a token), and the decode tokens run apart from the rows."""
    return StepStats(
        prefill_rows=rows,
        num_prefill_tokens=sum(map(sum, rows)) if prompt is None else prompt,
        num_decode_tokens=decode,
        num_sampled_tokens=decode + sum(map(len, rows)) if sampled is None else sampled,
        num_cache_query_tokens=queries,
        num_cache_hit_tokens=hits,
        num_preempted=0,
        step_time_s=0.02,
    )


def load(running: tuple[RunningRequest, ...] = (), num_running: int = 3) -> EngineLoad:
    return EngineLoad(
        num_running=num_running,
        num_waiting=1,
        num_kv_blocks_used=25,
        num_kv_blocks=100,
        running=running,
    )


def running_requests(n: int, arrival: float = 0.0) -> tuple[RunningRequest, ...]:
    return tuple(RunningRequest(f"req-{i}", 4, 0, arrival) for i in range(n))


def timings(ttft: float | None) -> RequestTimings:
    first = None if ttft is None else 10.0 + ttft
    return RequestTimings(10.0, None, first, 12.0, (), 5, 3, "length")


# -- the recorder alone -----------------------------------------------------------------------


def test_ring_buffers_stay_bounded() -> None:
    clock = Clock()
    rec = DashboardRecorder(history_s=5, prefill_steps=3, clock=clock)
    running = load(running_requests(MAX_RUNNING_ROWS + 20), num_running=MAX_RUNNING_ROWS + 20)
    for i in range(5000):
        clock.t += 0.01
        rec.observe_step(stats(((10, 20), (25,)) if i % 2 else (), decode=3), running)
        rec.observe_request(timings(0.1))
    feed = rec.feed()
    assert feed["seq"] == 5000
    assert len(feed["series"]) == 5  # seconds kept
    assert len(feed["prefill_steps"]) == 3
    assert len(feed["running"]) == MAX_RUNNING_ROWS
    assert feed["running_total"] == MAX_RUNNING_ROWS + 20
    assert len(rec._ttft) == TTFT_SAMPLES
    assert feed["summary"]["ttft_n"] <= TTFT_SAMPLES


def test_packing_arithmetic_and_since() -> None:
    clock = Clock()
    rec = DashboardRecorder(clock=clock)
    rec.observe_step(stats(((100, 20), (90, 30), (50,)), decode=2), load())
    feed = rec.feed()
    (step,) = feed["prefill_steps"]
    assert step["rows"] == [[100, 20], [90, 30], [50]]
    assert step["real"] == 290
    assert step["prompt_tokens"] == 290 and step["decode_tokens"] == 0
    assert step["packed"] == 3 * 120  # every row padded to the longest row
    assert step["padded"] == 5 * 100  # one prompt per row, padded to the longest prompt
    assert feed["summary"]["packed_fill"] == pytest.approx(290 / 360, abs=1e-4)
    assert feed["summary"]["padded_fill"] == pytest.approx(290 / 500, abs=1e-4)
    (second,) = feed["series"]
    assert second["prompt_tokens"] == 290
    assert second["gen_tokens"] == 2 + 5  # decodes plus one first token per prefilled prompt
    assert second["kv"] == 0.25

    assert rec.feed(since=feed["seq"])["prefill_steps"] == []
    assert rec.feed(since=feed["seq"])["series"] == []
    clock.t += 1.0
    rec.observe_step(stats(decode=4), load())
    newer = rec.feed(since=feed["seq"])
    assert newer["prefill_steps"] == []
    assert [s["gen_tokens"] for s in newer["series"]] == [4]

    restarted = rec.feed(since=10**9)  # a page from before a restart gets everything again
    assert restarted["since"] == 0 and len(restarted["series"]) == 2


def test_tokens_per_second_over_complete_seconds() -> None:
    clock = Clock(1000.0)
    rec = DashboardRecorder(clock=clock)
    for _ in range(10 * 20):  # 10 s at 20 steps/s, 8 tokens each
        clock.t += 0.05
        rec.observe_step(stats(decode=8), load())
    summary = rec.feed()["summary"]
    assert summary["tokens_per_s"] == pytest.approx(160, rel=0.15)
    assert summary["steps_per_s"] == pytest.approx(20, rel=0.15)


def test_running_table_and_config_follow_the_engine() -> None:
    clock = Clock()
    rec = DashboardRecorder(clock=clock)
    assert rec.feed()["config"] is None  # before the engine has started
    rec.set_info(
        EngineInfo(
            max_model_len=2048,
            vocab_size=8192,
            eos_token_ids=frozenset({1}),
            block_size=16,
            num_kv_blocks=100,
            max_num_seqs=8,
            max_num_batched_tokens=4096,
            row_capacity=256,
            prefill_mode="packed",
            batch_invariant=False,
            prefix_caching=True,
            dtype="bfloat16",
            linear_backend="onednn",
            decode_attention="sdpa",
            threads=2,
            threads_tuned=True,
            quantization="none",
        )
    )
    a = RunningRequest("req-1", 30, 3, clock.t - 2.0)
    b = RunningRequest("req-2", 5, 1, clock.t - 1.0, adapter="sql-lora")
    rec.observe_step(stats(), load((a, b), num_running=2))
    feed = rec.feed()
    assert feed["running"] == [
        {"id": "req-1", "adapter": None, "prompt_tokens": 30, "generated_tokens": 3, "age_s": 2.0},
        {
            "id": "req-2",
            "adapter": "sql-lora",
            "prompt_tokens": 5,
            "generated_tokens": 1,
            "age_s": 1.0,
        },
    ]
    assert feed["running_total"] == 2
    assert feed["config"]["row_capacity"] == 256
    assert feed["config"]["eos_token_ids"] == [1]
    assert feed["config"]["prefix_caching"] is True
    json.dumps(feed)  # the config is plain JSON
    # Every step's published load replaces the table: a request that left is gone at once.
    clock.t += 0.01
    rec.observe_step(stats(), load((), num_running=0))
    feed = rec.feed()
    assert feed["running"] == [] and feed["running_total"] == 0
    assert feed["summary"]["running"] == 0


def test_ttft_percentiles() -> None:
    clock = Clock()
    rec = DashboardRecorder(clock=clock)
    for i in range(1, 101):
        rec.observe_request(timings(i / 100))
    rec.observe_request(timings(None))  # never got a token: not a TTFT sample
    summary = rec.feed()["summary"]
    assert summary["ttft_n"] == 100
    assert summary["ttft_p50_s"] == pytest.approx(0.50)
    assert summary["ttft_p99_s"] == pytest.approx(0.99)
    clock.t += 61  # out of the headline window, still on the chart
    feed = rec.feed()
    assert feed["summary"]["ttft_n"] == 0 and feed["summary"]["ttft_p50_s"] is None
    assert sum(p["n"] for p in feed["ttft_series"]) == 100


def test_mixed_rows_chunks_and_generated_tokens() -> None:
    """Decode tokens mixed into the rows count as the rows' real tokens (the fill compares
    like with like) but not as prompt tokens; a chunk that does not end its prompt generates
    nothing; a step of decode tokens alone is not a prefill step."""
    clock = Clock()
    rec = DashboardRecorder(clock=clock)
    # a 200-token chunk of a longer prompt, a 30-token prompt's end and three decode tokens
    rec.observe_step(stats(((200,), (30, 1, 1, 1)), decode=3, prompt=230, sampled=4), load())
    feed = rec.feed()
    (step,) = feed["prefill_steps"]
    assert step["real"] == 233
    assert step["prompt_tokens"] == 230 and step["decode_tokens"] == 3
    assert step["packed"] == 2 * 200 and step["padded"] == 5 * 200
    (second,) = feed["series"]
    assert second["prompt_tokens"] == 230
    assert second["gen_tokens"] == 4
    clock.t += 0.01
    rec.observe_step(stats(((1, 1, 1),), decode=3, prompt=0, sampled=3), load())
    assert len(rec.feed()["prefill_steps"]) == 1  # decode tokens alone: not drawn as a prefill
    assert [s["gen_tokens"] for s in rec.feed()["series"]] == [7]


def test_prefix_cache_hit_rate_over_the_rate_window() -> None:
    clock = Clock(1000.0)
    rec = DashboardRecorder(clock=clock)
    assert rec.feed()["summary"]["prefix_cache_hit_rate"] is None  # nothing looked up yet
    for i in range(10):  # one admission a second: 100 prompt tokens looked up, 32 found
        clock.t = 1000.5 + i
        rec.observe_step(stats(((68,),), queries=100, hits=32), load())
    clock.t = 1010.5
    summary = rec.feed()["summary"]
    assert summary["prefix_cache_queries"] == 1000
    assert summary["prefix_cache_hits"] == 320
    assert summary["prefix_cache_hit_rate"] == pytest.approx(0.32, abs=1e-4)
    series = rec.feed()["series"]
    assert [(s["cache_queries"], s["cache_hits"]) for s in series] == [(100, 32)] * 10
    # The second in progress is not in the window yet; old seconds leave it.
    rec.observe_step(stats(((100,),), queries=100, hits=0), load())
    assert rec.feed()["summary"]["prefix_cache_queries"] == 1000
    clock.t = 1030.5
    summary = rec.feed()["summary"]
    assert summary["prefix_cache_queries"] == 0 and summary["prefix_cache_hit_rate"] is None


# -- the real server --------------------------------------------------------------------------

RUNNING_KEYS = {"adapter", "id", "prompt_tokens", "generated_tokens", "age_s"}
REQUEST_ID = re.compile(r"^req-\d+$")


def _strings(value: Any) -> list[str]:
    """Every string value in a JSON document (keys excluded)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_live_feed_shape_and_no_prompt_text(dash_server, load, wait_for) -> None:
    url = dash_server.url + "/dashboard/feed"

    def busy() -> dict | None:
        feed = httpx.get(url, timeout=10).json()
        s = feed["summary"]
        packed = any(len(row) > 1 for step in feed["prefill_steps"] for row in step["rows"])
        if packed and s["ttft_n"] and s["tokens_per_s"] > 0 and feed["running"]:
            return feed
        return None

    feed = wait_for(busy, 60, "a feed with packed rows, TTFTs, tokens/s and running requests")
    raw = json.dumps(feed)
    assert dash_server.canary not in raw
    assert {"seq", "now", "summary", "series", "prefill_steps", "ttft_series", "running"} <= set(
        feed
    )
    # The only strings anywhere: the model name, the config's choices (prefill mode, resolved
    # kernels) and internal request ids.
    kernels = ("prefill_mode", "dtype", "linear_backend", "decode_attention", "quantization")
    allowed = {feed["model"], *(feed["config"][key] for key in kernels)}
    for s in _strings(feed):
        assert s in allowed or REQUEST_ID.match(s), f"unexpected string in the feed: {s!r}"
    for r in feed["running"]:
        assert set(r) == RUNNING_KEYS
        assert r["prompt_tokens"] > 0 and r["generated_tokens"] >= 0 and r["age_s"] >= 0
    for step in feed["prefill_steps"]:
        assert all(n > 0 for row in step["rows"] for n in row)
        assert all(sum(row) <= feed["config"]["row_capacity"] for row in step["rows"])
        # Packing can cost more than padding (130,120,120 in rows of 256: 2x250 > 3x130).
        assert step["real"] <= min(step["packed"], step["padded"])
        # rows of prompt pieces (every recorded step has some) and decode tokens mixed in
        assert step["prompt_tokens"] > 0 and step["decode_tokens"] >= 0
        assert step["prompt_tokens"] + step["decode_tokens"] == step["real"]
    assert len(feed["series"]) <= feed["history_s"]
    s = feed["summary"]
    assert 0 < s["kv_cache_usage"] <= 1 and s["kv_blocks"] > 0
    assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
    assert feed["config"]["prefix_caching"] is True
    assert 0 <= s["prefix_cache_hits"] <= s["prefix_cache_queries"]
    rate = s["prefix_cache_hit_rate"]
    assert (rate is None) == (s["prefix_cache_queries"] == 0)
    assert rate is None or 0 <= rate <= 1
    for second in feed["series"]:
        assert 0 <= second["cache_hits"] <= second["cache_queries"]

    later = httpx.get(url, params={"since": feed["seq"]}, timeout=10).json()
    assert all(step["seq"] > feed["seq"] for step in later["prefill_steps"])
    assert later["seq"] >= feed["seq"]
    assert not load.errors, load.errors[:3]


def test_dashboard_is_open_like_metrics_but_the_api_is_not(dash_server) -> None:
    with httpx.Client(base_url=dash_server.url, timeout=10) as client:
        assert client.get("/v1/models").status_code == 401  # the key is required there...
        keyed = client.get("/v1/models", headers={"Authorization": f"Bearer {dash_server.api_key}"})
        assert keyed.status_code == 200
        assert client.get("/metrics").status_code == 200  # ...and not here, nor below
        page = client.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert client.get("/dashboard/feed").status_code == 200
        assert client.get("/dashboard/feed", params={"since": -1}).status_code == 400
        # No CDN, no external anything: every referenced resource is relative.
        for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
            body = client.get(path)
            assert body.status_code == 200, path
            assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", body.text), path
            assert not re.search(r"(fetch|import)\s*\(\s*[\"'`]https?:", body.text), path
            assert "@import" not in body.text and "url(http" not in body.text, path
        for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert client.get("/" + ref).status_code == 200, ref
