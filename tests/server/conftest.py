"""Fixtures for the HTTP service tests: the shared default `packserve serve` (started by
tests/conftest.py's `launch_server`, which also checks every server's log after each test),
and small helpers (SSE parsing, /metrics snapshots, bounded polling).

Everything that waits has a bound, so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from packserve.engine.engine import Engine
from packserve.server.launcher import ServerProcess

HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@pytest.fixture(scope="session")
def server(launch_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The shared default server: no API key, default limits. Tests use it one at a time."""
    return launch_server()


@pytest.fixture(scope="session")
def smollm2_server(launch_server: Callable[..., ServerProcess], smollm2_dir: Path) -> ServerProcess:
    """A server of the real SmolLM2-135M-Instruct, default settings."""
    return launch_server("--model", str(smollm2_dir))


@pytest.fixture(scope="session")
def base_url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(scope="session")
def model_name(tiny_model_dir: Path) -> str:
    """The served model name defaults to the model folder's basename."""
    return tiny_model_dir.name


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
        yield client


@pytest.fixture(scope="session")
def oai(base_url: str) -> openai.OpenAI:
    """The official client, unmodified (no retries, so a 429 or 5xx is seen as it is)."""
    return openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=60.0)


# -- the engine offline, in this process (tests/conftest.py: offline, chat_ids) ------------------


@pytest.fixture(scope="session")
def engine(offline_engine: Engine) -> Engine:
    return offline_engine


@pytest.fixture(scope="session")
def tokenizer(offline_engine: Engine) -> Any:
    return offline_engine.tokenizer


# -- helpers --------------------------------------------------------------------------------------


def _parse_sse(lines: Iterable[str]) -> list[Any]:
    """`data:` payloads of an SSE body: dicts, or the string "[DONE]". Fails on anything
    after [DONE] and on lines that are neither data nor blank."""
    events: list[Any] = []
    for line in lines:
        if not line.strip():
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not events or events[-1] != "[DONE]", f"data after [DONE]: {line!r}"
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="session")
def parse_sse() -> Callable[[Iterable[str]], list[Any]]:
    return _parse_sse


def _snapshot(url: str, client: httpx.Client | None = None) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    if client is None:
        r = httpx.get(url + "/metrics", timeout=HTTP_TIMEOUT)
    else:
        r = client.get(url + "/metrics")
    assert r.status_code == 200, r.text
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="session")
def metrics() -> Callable[..., dict[tuple[str, tuple], float]]:
    """metrics(url) -> {(sample name, sorted label pairs): value}."""
    return _snapshot


@pytest.fixture(scope="session")
def metric(model_name: str) -> Callable[..., float]:
    """metric(snapshot, name, **labels): one sample's value for this model (0 if absent)."""

    def get(snapshot: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model_name": model_name, **labels}.items())))
        return snapshot.get(key, 0.0)

    return get


def _wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll until predicate() is truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Any]:
    return _wait_for


@pytest.fixture(scope="session")
def wait_idle(metrics, metric, wait_for) -> Callable[[str], None]:
    """wait_idle(url): bounded wait until no request runs, waits or holds KV blocks."""

    def idle(url: str, timeout: float = 10.0) -> None:
        def check() -> bool:
            snap = metrics(url)
            return (
                metric(snap, "packserve:num_requests_running") == 0
                and metric(snap, "packserve:num_requests_waiting") == 0
                and metric(snap, "packserve:kv_cache_usage_perc") == 0
            )

        wait_for(check, timeout, what=f"{url} to be idle")

    return idle


@pytest.fixture(scope="session")
def settle(wait_idle) -> Callable[[str], None]:
    """settle(url): make sure nothing runs before a test measures something. If the gauges
    still show work after a short wait, one tiny request runs a fresh engine step (the gauges
    are only updated by steps), then the wait is repeated, bounded as always."""

    def run(url: str) -> None:
        try:
            wait_idle(url, timeout=2.0)
            return
        except AssertionError:
            pass
        r = httpx.post(
            url + "/v1/completions", json={"prompt": "settle", "max_tokens": 1}, timeout=60.0
        )
        assert r.status_code == 200, r.text
        wait_idle(url, timeout=10.0)

    return run


def assert_error_body(response: httpx.Response, status: int, type_: str | None = None) -> dict:
    """The response has `status` and OpenAI's error object; returns the inner error."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if type_ is not None:
        assert error["type"] == type_, error
    return error


@pytest.fixture(scope="session")
def error_body() -> Callable[..., dict]:
    """error_body(response, status, type=None) -> the checked inner error object."""
    return assert_error_body
