"""Fixtures for the reliability and security tests: real `packserve serve` processes on
loopback ports over the tiny model, the offline engine for the expected outputs, and helpers
(SSE streaming, /metrics gauges, bounded polling, OpenAI error bodies) shared through the
`h` fixture (the tests run with --import-mode=importlib, so nothing here is imported).

Every wait is bounded, so a broken server fails a test instead of hanging it. Each test
records the figures it produced (requests, failures, seconds, KV blocks) with `figures`;
they are printed in the terminal summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from packserve.engine.engine import Completion, Engine
from packserve.scheduler import SamplingParams

HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0  # importing torch and loading the model on a busy 2-core machine
HTTP_TIMEOUT = httpx.Timeout(120.0, connect=15.0)
P = "packserve:"
# Intra-op threads of the servers and of the offline engine: the same on both sides, because
# float32 sums in another order can flip a near tie (bench/stress.py found a prompt whose
# greedy output differs between 1 and 2 threads). One, because on a busy 2-core machine two
# OpenMP threads mostly wait on each other.
THREADS = 1


# -- servers --------------------------------------------------------------------------------------


def _packserve() -> str:
    here = Path(sys.executable).parent / "packserve"
    if here.exists():
        return str(here)
    found = shutil.which("packserve")
    if found is None:
        pytest.fail("the packserve console script is not installed")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One `packserve serve` subprocess of this test session."""

    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    flags: tuple[str, ...] = field(default=())

    def logs(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill our process (by its Popen handle) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)


_STARTED: list[Server] = []


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(timeout=httpx.Timeout(3.0)) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {server.proc.returncode} before it was ready:\n"
                    + server.logs()
                )
            try:
                r = client.get(server.url + "/ready")
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout}s (last: {last}):\n{server.logs()}")


@pytest.fixture(scope="session")
def launch(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Factory: start `packserve serve --model <tiny> --port <free> *flags` and wait (bounded)
    until /ready is 200. Every server still running is killed at the end of the session."""
    logs = tmp_path_factory.mktemp("reliability-servers")

    def start(*flags: str) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_")}
        env["OMP_NUM_THREADS"] = str(THREADS)
        error: Exception | None = None
        for _ in range(3):  # a free port can be taken between the probe and the bind
            port = _free_port()
            log_path = logs / f"server-{port}.log"
            cmd = [_packserve(), "serve", "--model", str(tiny_model_dir)]
            cmd += ["--host", HOST, "--port", str(port), *flags]
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
                )
            server = Server(f"http://{HOST}:{port}", port, proc, log_path, tuple(flags))
            _STARTED.append(server)
            try:
                _wait_ready(server, READY_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                server.stop()
                error = exc
                if "address already in use" in server.logs().lower():
                    continue
                break
            return server
        raise AssertionError(f"could not start packserve {' '.join(flags)}: {error}")

    yield start
    for server in _STARTED:
        server.stop()


@pytest.fixture(scope="session")
def shared_server(launch) -> Server:
    """A default server (no key, default limits) for the tests that leave it as they found it:
    load, disconnect storm, nasty inputs. They use it one at a time."""
    return launch()


API_KEY = "sk-reliability-0123456789abcdef"


@pytest.fixture(scope="session")
def locked_server(launch) -> Server:
    """A server with an API key and a 128-token context (so any generated request is cheap):
    the auth tests and the fuzzer (which sends the key)."""
    return launch("--api-key", API_KEY, "--max-model-len", "128")


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_server_500: the test provokes 500s on purpose (engine fault hook)"
    )


_ACCESS_5XX = re.compile(r'"[A-Z]+ [^"]*" (5\d\d)\b')


@pytest.fixture(autouse=True)
def no_server_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: no server of this session logged a traceback or answered 5xx
    (503 is allowed: loading or draining; 500 only in tests marked allow_server_500)."""
    allowed = {"503"}
    if request.node.get_closest_marker("allow_server_500"):
        allowed.add("500")
    offsets = {id(s): len(s.logs(tail=10**9)) for s in _STARTED}
    yield
    problems = []
    for s in list(_STARTED):
        for line in s.logs(tail=10**9)[offsets.get(id(s), 0) :].splitlines():
            m = _ACCESS_5XX.search(line)
            if (m and m.group(1) not in allowed) or "Traceback" in line or "unhandled" in line:
                problems.append(f"{s.url}: {line}")
    assert not problems, "server errors during the test:\n" + "\n".join(problems[:20])


# -- expected outputs: the offline engine, each prompt alone ---------------------------------------


@pytest.fixture(scope="session")
def offline_engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


@pytest.fixture(scope="session")
def tok(offline_engine: Engine) -> Any:
    return offline_engine.tokenizer


@pytest.fixture(scope="session")
def offline(offline_engine: Engine) -> Callable[..., Completion]:
    """offline(prompt, max_tokens, **params) -> the engine's Completion for that prompt (text
    or token ids) run alone; greedy unless params say otherwise. Cached."""
    cache: dict[tuple, Completion] = {}

    def run(prompt: str | list[int], max_tokens: int, **params: Any) -> Completion:
        params.setdefault("temperature", 0.0)
        key = (
            prompt if isinstance(prompt, str) else tuple(prompt),
            max_tokens,
            tuple(sorted(params.items())),
        )
        if key not in cache:
            sampling = SamplingParams(max_tokens=max_tokens, **params)
            # The servers' thread count (see THREADS), restored afterwards for other tests.
            threads = torch.get_num_threads()
            torch.set_num_threads(THREADS)
            try:
                cache[key] = offline_engine.generate([prompt], sampling)[0]
            finally:
                torch.set_num_threads(threads)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def chat_ids(tok: Any) -> Callable[[list[dict[str, str]]], list[int]]:
    """The prompt ids the server makes of chat messages (the model's chat template)."""

    def render(messages: list[dict[str, str]]) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False).input_ids)

    return render


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
