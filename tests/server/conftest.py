"""Fixtures for the HTTP service tests: real `packserve serve` processes on loopback ports,
the real tiny model, and small helpers (SSE parsing, /metrics snapshots, bounded polling).

Everything that waits has a bound, so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from packserve.engine.engine import Completion, Engine
from packserve.scheduler import SamplingParams

HOST = "127.0.0.1"
READY_TIMEOUT_S = 90.0  # importing torch + loading the model on a busy 2-core machine
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def _packserve() -> str:
    """The console script of the venv that runs the tests (falls back to PATH)."""
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
    """One `packserve serve` subprocess."""

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
        """Kill the process (ours, by its Popen handle) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # nothing more we can do
            self.proc.wait(timeout=15)


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
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


_STARTED: list[Server] = []  # every server of this session, for the log check below


@pytest.fixture(scope="session")
def launch_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Factory: start `packserve serve --model <tiny> --port <free> *flags`, wait (bounded)
    until GET /ready is 200 and return the Server. Every server still running is killed at
    the end of the session; fixtures and tests may `stop()` theirs earlier."""
    started = _STARTED
    logs = tmp_path_factory.mktemp("servers")

    def launch(*flags: str, env: dict[str, str] | None = None, attempts: int = 3) -> Server:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_")}
        base_env.update(env or {})
        error: Exception | None = None
        for _ in range(attempts):  # a free port can be taken between probe and bind
            port = _free_port()
            log_path = logs / f"server-{port}.log"
            cmd = [
                _packserve(),
                "serve",
                "--model",
                str(tiny_model_dir),
                "--host",
                HOST,
                "--port",
                str(port),
                *flags,
            ]
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=base_env,
                )
            server = Server(f"http://{HOST}:{port}", port, proc, log_path, tuple(flags))
            started.append(server)
            try:
                _wait_ready(server, READY_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                server.stop()
                error = exc
                if "address already in use" in server.logs().lower():
                    continue  # another process took the port: try another one
                break
            return server
        raise AssertionError(f"could not start packserve {' '.join(flags)}: {error}")

    yield launch
    for server in started:
        server.stop()


_ACCESS_500 = re.compile(r'"[A-Z]+ [^"]*" 5\d\d\b(?<!503)')


@pytest.fixture(autouse=True)
def no_server_errors() -> Iterator[None]:
    """After every test: no server answered 5xx (503 while draining or loading is allowed)
    and none logged a traceback while the test ran."""
    offsets = {id(s): len(s.logs(tail=10**9)) for s in _STARTED}
    yield
    problems = []
    for s in list(_STARTED):
        new = s.logs(tail=10**9)[offsets.get(id(s), 0) :]
        for line in new.splitlines():
            if _ACCESS_500.search(line) or "Traceback" in line or "unhandled error" in line:
                problems.append(f"{s.url}: {line}")
    assert not problems, "server errors during the test:\n" + "\n".join(problems[:20])


@pytest.fixture(scope="session")
def server(launch_server: Callable[..., Server]) -> Server:
    """The shared default server: no API key, default limits. Tests use it one at a time."""
    return launch_server()


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
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


# -- the engine offline, in this process: the expected outputs -----------------------------------


@pytest.fixture(scope="session")
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


@pytest.fixture(scope="session")
def tokenizer(engine: Engine) -> Any:
    return engine.tokenizer


@pytest.fixture(scope="session")
def offline(engine: Engine) -> Callable[..., Completion]:
    """offline(prompt, max_tokens, **params): the engine's own output for one prompt (text or
    token ids), greedy unless params say otherwise."""

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
            cache[key] = engine.generate([prompt], sampling)[0]
        return cache[key]

    return run


@pytest.fixture(scope="session")
def chat_ids(tokenizer: Any) -> Callable[[list[dict[str, str]]], list[int]]:
    """The prompt ids of chat messages, rendered with the model's chat template."""

    def render(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    return render


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
