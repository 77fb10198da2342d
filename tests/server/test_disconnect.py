"""A client that leaves mid-request: its request is aborted, its KV blocks come back, it is
counted as an abort, and the server carries on serving."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

MAX_TOKENS = 1800
LONG = {"prompt": "Tell me a very long story.", "max_tokens": MAX_TOKENS, "ignore_eos": True}
CHAT_LONG = {
    "messages": [{"role": "user", "content": "Talk for a long time."}],
    "max_tokens": MAX_TOKENS,
    "ignore_eos": True,
    "n": 2,
}


@pytest.fixture
def state(metrics, metric, base_url) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        snap = metrics(base_url)
        return {
            "running": metric(snap, "packserve:num_requests_running"),
            "kv": metric(snap, "packserve:kv_cache_usage_perc"),
            "abort": metric(snap, "packserve:request_success_total", finished_reason="abort"),
            "generated": metric(snap, "packserve:generation_tokens_total"),
            "steps": metric(snap, "packserve:iteration_tokens_total_count"),
            "e2e": metric(snap, "packserve:e2e_request_latency_seconds_count"),
        }

    return read


def _disconnect_stream(base_url: str, path: str, body: dict, events: int) -> dict[str, float]:
    """Stream `body`, read `events` data lines, then close the connection. Returns nothing
    but proves the request really was streaming when the client left."""
    seen = 0
    with (
        httpx.Client(base_url=base_url, timeout=httpx.Timeout(30.0)) as client,
        client.stream("POST", path, json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == events:
                # Read the gauges while still connected: leaving iter_lines early closes
                # the connection, and the server then aborts at once.
                during = httpx.get(base_url + "/metrics", timeout=30.0).text
                break
    # leaving the `with` blocks closes the response and the client, and with them the socket
    assert seen == events
    return {"metrics_during": during}  # type: ignore[dict-item]


def _disconnect_whole(base_url: str, body: dict) -> None:
    timeout = httpx.Timeout(30.0, read=1.0)  # gives up long before MAX_TOKENS are made
    with (
        httpx.Client(base_url=base_url, timeout=timeout) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/v1/completions", json=body)


def _wait(wait_for, state, cond, what: str, timeout: float = 10.0) -> dict[str, float]:
    last: dict[str, float] = {}

    def check() -> bool:
        last.update(state())
        return cond(last)

    try:
        wait_for(check, timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; metrics now {last}") from None
    return dict(last)


def _idle(s: dict[str, float]) -> bool:
    return s["running"] == 0 and s["kv"] == 0


def _assert_engine_let_go(http, offline, wait_for, state, before, choices: int) -> None:
    """Independent of the gauges' freshness: small requests make the engine step (and so
    refresh the gauges) until they read 0; the engine stepped far fewer times than the
    abandoned request(s) would have needed, so they were aborted, not run to the end."""

    def probe_then_idle() -> bool:
        r = http.post(
            "/v1/completions", json={"prompt": "After", "max_tokens": 8, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline("After", 8).text
        return _idle(state())

    wait_for(probe_then_idle, 10.0, interval=0.2, what="the engine to drop the request")
    after = state()
    assert after["steps"] - before["steps"] < MAX_TOKENS - 20, (before, after)
    assert after["generated"] - before["generated"] < choices * MAX_TOKENS, (before, after)


# -- streamed -------------------------------------------------------------------------------------


def test_stream_disconnect_returns_gauges_to_zero(base_url, http, offline, wait_for, state, settle):
    settle(base_url)
    _disconnect_stream(base_url, "/v1/completions", LONG, 3)
    _wait(wait_for, state, _idle, "num_requests_running and kv_cache_usage_perc to read 0")
    r = http.post("/v1/completions", json={"prompt": "After", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline("After", 8).text


def test_stream_disconnect_was_running_with_kv(base_url, metric, settle):
    from prometheus_client.parser import text_string_to_metric_families

    settle(base_url)
    during = _disconnect_stream(base_url, "/v1/completions", LONG, 3)["metrics_during"]
    snap = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(during)
        for s in f.samples
    }
    assert metric(snap, "packserve:num_requests_running") == 1
    assert metric(snap, "packserve:kv_cache_usage_perc") > 0


def test_stream_disconnect_frees_the_engine(base_url, http, offline, wait_for, state, settle):
    settle(base_url)
    before = state()
    _disconnect_stream(base_url, "/v1/completions", LONG, 3)
    _assert_engine_let_go(http, offline, wait_for, state, before, choices=1)


def test_stream_disconnect_is_counted_as_abort(base_url, wait_for, state, settle):
    settle(base_url)
    before = state()
    _disconnect_stream(base_url, "/v1/completions", LONG, 3)
    after = _wait(
        wait_for,
        state,
        lambda s: s["abort"] >= before["abort"] + 1,
        'request_success_total{finished_reason="abort"} to count the abandoned stream',
    )
    assert after["abort"] == before["abort"] + 1
    assert after["e2e"] == before["e2e"] + 1


def test_chat_stream_disconnect_with_n2_frees_the_engine(
    base_url, http, offline, wait_for, state, settle
):
    settle(base_url)
    before = state()
    _disconnect_stream(base_url, "/v1/chat/completions", CHAT_LONG, 10)
    _assert_engine_let_go(http, offline, wait_for, state, before, choices=2)


# -- not streamed ---------------------------------------------------------------------------------


def test_non_streamed_disconnect_returns_gauges_to_zero(
    base_url, http, offline, wait_for, state, settle
):
    settle(base_url)
    before = state()
    _disconnect_whole(base_url, LONG)
    after = _wait(wait_for, state, _idle, "num_requests_running and kv_cache_usage_perc to read 0")
    assert after["abort"] == before["abort"] + 1
    r = http.post("/v1/completions", json={"prompt": "After", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline("After", 8).text


def test_non_streamed_disconnect_aborts_and_frees_the_engine(
    base_url, http, offline, wait_for, state, settle
):
    settle(base_url)
    before = state()
    _disconnect_whole(base_url, LONG)
    after = _wait(
        wait_for, state, lambda s: s["abort"] >= before["abort"] + 1, "the abort to be counted"
    )
    assert after["abort"] == before["abort"] + 1
    _assert_engine_let_go(http, offline, wait_for, state, before, choices=1)
