"""Fixtures for the reliability and security tests: real `packserve serve` processes on
loopback ports over the tiny model (tests/conftest.py's `launch_server`, which also checks
every server's log after each test, and gives the offline engine's expected outputs), and
helpers (SSE streaming, /metrics gauges, bounded polling, OpenAI error bodies) shared through
the `h` fixture (the tests run with --import-mode=importlib, so nothing here is imported).

Every wait is bounded, so a broken server fails a test instead of hanging it. Each test
records the figures it produced (requests, failures, seconds, KV blocks) with `figures`;
they are printed in the terminal summary.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from packserve.engine.engine import Engine
from packserve.server.launcher import ServerProcess

HTTP_TIMEOUT = httpx.Timeout(120.0, connect=15.0)
P = "packserve:"


# -- servers --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def launch(launch_server: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    """launch(*flags, env=None, command=None): tests/conftest.py's `launch_server`."""
    return launch_server


@pytest.fixture(scope="session")
def shared_server(launch) -> ServerProcess:
    """A default server (no key, default limits) for the tests that leave it as they found it:
    load, disconnect storm, nasty inputs. They use it one at a time."""
    return launch()


API_KEY = "sk-reliability-0123456789abcdef"


@pytest.fixture(scope="session")
def locked_server(launch) -> ServerProcess:
    """A server with an API key and a 128-token context (so any generated request is cheap):
    the auth tests and the fuzzer (which sends the key)."""
    return launch("--api-key", API_KEY, "--max-model-len", "128")


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def tok(offline_engine: Engine) -> Any:
    return offline_engine.tokenizer


# -- figures for the summary ----------------------------------------------------------------------

_FIGURES: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """figures(**values): record what this test produced, for the terminal summary."""

    def record(**values: Any) -> None:
        _FIGURES.append((request.node.name, values))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, values in _FIGURES:
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# -- helpers, shared through the `h` fixture ----------------------------------------------------


class Helpers:
    """Small stateless helpers. Everything that waits is bounded."""

    P = P
    HTTP_TIMEOUT = HTTP_TIMEOUT

    @staticmethod
    def parse_sse(lines: list[str]) -> list[Any]:
        """`data:` payloads: dicts, or the string "[DONE]". Fails on data after [DONE] and on
        lines that are neither data nor blank."""
        events: list[Any] = []
        for line in lines:
            if not line.strip():
                continue
            assert line.startswith("data: "), f"not an SSE data line: {line!r}"
            assert not events or events[-1] != "[DONE]", f"data after [DONE]: {line!r}"
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
        return events

    @staticmethod
    async def stream(
        client: httpx.AsyncClient, path: str, body: dict[str, Any], usage: bool = True
    ) -> tuple[int, list[Any]]:
        """POST a streamed request and read it to the end: (status, parsed events); for a
        non-200 the events are [the JSON body]."""
        payload = {**body, "stream": True}
        if usage:
            payload["stream_options"] = {"include_usage": True}
        async with client.stream("POST", path, json=payload) as r:
            if r.status_code != 200:
                return r.status_code, [json.loads(await r.aread())]
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers
            lines = [line async for line in r.aiter_lines()]
        return 200, Helpers.parse_sse(lines)

    @staticmethod
    def gauges(url: str) -> dict[str, float]:
        """running, waiting, KV usage (read at scrape time), and the finished counters."""
        r = httpx.get(url + "/metrics", timeout=HTTP_TIMEOUT)
        assert r.status_code == 200, r.text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                if s.name == P + "num_requests_running":
                    out["running"] = s.value
                elif s.name == P + "num_requests_waiting":
                    out["waiting"] = s.value
                elif s.name == P + "kv_cache_usage_perc":
                    out["kv"] = s.value
                elif s.name == P + "request_success_total":
                    out[s.labels["finished_reason"]] = s.value
        return out

    @staticmethod
    def kv_blocks_used(url: str) -> int:
        """KV blocks in use now: the usage gauge (read at scrape time) times the pool size
        (from the dashboard feed, which knows it once a step ran)."""
        total = httpx.get(url + "/dashboard/feed", timeout=HTTP_TIMEOUT).json()["summary"]
        return round(Helpers.gauges(url)["kv"] * (total["kv_blocks"] or 0))

    @staticmethod
    def wait_for(
        predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            last = predicate()
            if last:
                return last
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    @staticmethod
    def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
        """Bounded poll until running, waiting and KV usage all read 0; returns the gauges."""
        seen: dict[str, float] = {}

        def idle() -> bool:
            seen.update(Helpers.gauges(url))
            return seen["running"] == 0 and seen["waiting"] == 0 and seen["kv"] == 0

        try:
            Helpers.wait_for(idle, timeout, interval=0.2, what=f"{url} to be idle")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; gauges now {seen}") from None
        return seen

    @staticmethod
    def error_object(body: Any) -> dict[str, Any]:
        """`body` is OpenAI's error object; returns the inner error."""
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str) and error["type"], error
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] is None or isinstance(error["code"], (str, int)), error
        return error

    @staticmethod
    def error_body(r: httpx.Response, status: int, type_: str | None = None) -> dict[str, Any]:
        """The response has `status`, a JSON content type and OpenAI's error object."""
        assert r.status_code == status, (r.status_code, r.text[:500])
        assert r.headers["content-type"].startswith("application/json"), r.headers
        error = Helpers.error_object(r.json())
        if type_ is not None:
            assert error["type"] == type_, error
        return error

    @staticmethod
    def completion_tokens(path: str, events: list[Any]) -> dict[int, dict[str, Any]]:
        """Per choice index of a streamed response: its text, the token strings from the
        logprobs, its finish reason and the number of chunks."""
        out: dict[int, dict[str, Any]] = {}
        for ev in events:
            if ev == "[DONE]" or "error" in ev:
                continue
            for c in ev["choices"]:
                acc = out.setdefault(
                    c["index"], {"text": "", "tokens": [], "finish_reason": None, "chunks": 0}
                )
                acc["chunks"] += 1
                if path == "/v1/completions":
                    acc["text"] += c["text"]
                    if c["logprobs"]:
                        acc["tokens"] += c["logprobs"]["tokens"]
                else:
                    acc["text"] += c["delta"].get("content") or ""
                    if c["logprobs"]:
                        acc["tokens"] += [e["token"] for e in c["logprobs"]["content"]]
                if c["finish_reason"] is not None:
                    assert acc["finish_reason"] is None, ("two finish reasons", c)
                    acc["finish_reason"] = c["finish_reason"]
        return out

    @staticmethod
    def run(coro: Any, timeout: float) -> Any:
        """asyncio.run with an overall bound."""
        return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def h() -> type[Helpers]:
    return Helpers
