"""Fixtures for the deployment tests: the shipped files, real `packserve serve` replicas on
loopback ports (tests/conftest.py's `launch_server`, which also checks every server's log after
each test), external tools (prometheus, promtool, nginx, hadolint) found or skipped with a
reason, and bounded helpers.

Every process is started by a fixture, tracked by its Popen handle and stopped at teardown;
every wait has a bound, so a broken piece fails a test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from packserve.server.launcher import HOST, ServerProcess, free_port

HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
INSTALL_HINT = "run deploy/ci/install-tools.sh (Debian: apt-get install prometheus nginx)"


# -- small helpers ---------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll until predicate() is truthy (and return it); fail after `timeout` seconds.
    Exceptions inside predicate count as "not yet" (a server that is still starting)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - reported if the wait fails
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def find_tool(name: str) -> str | None:
    """A tool from this venv's bin, PATH, or the sbin folders (nginx lives in /usr/sbin)."""
    venv = Path(sys.executable).parent / name
    if venv.exists():
        return str(venv)
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None


def sample_names(metrics_text: str) -> set[str]:
    """Every sample name in a Prometheus exposition (histograms give _bucket/_sum/_count,
    counters _total, both also _created)."""
    return {
        sample.name
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    }


def metric_total(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, from GET url/metrics."""
    r = httpx.get(url + "/metrics", timeout=HTTP_TIMEOUT)
    r.raise_for_status()
    total = 0.0
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def parse_sse(lines: Iterable[str]) -> list[Any]:
    """The `data:` payloads of an SSE body: dicts, or the string "[DONE]"."""
    events: list[Any] = []
    for line in lines:
        if not line.strip():
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    """A subprocess we started, with its combined output in a log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def logs(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM (packserve drains, prometheus and nginx shut down cleanly)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; reaped either way."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # nothing more we can do
            self.proc.wait(timeout=15)


@pytest.fixture(scope="session")
def start_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Proc]]:
    """start_process(name, argv, env=None, cwd=None) -> Proc. All are stopped at session end;
    tests and fixtures may stop theirs earlier."""
    started: list[Proc] = []
    logs = tmp_path_factory.mktemp("deploy-logs")

    def start(
        name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Proc:
        log_path = logs / f"{name}-{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
            )
        p = Proc(name, proc, log_path)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        p.stop(timeout=5)


@dataclass
class Replica:
    """One `packserve serve` on 127.0.0.1:port."""

    process: ServerProcess

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@pytest.fixture(scope="session")
def launch_replicas(launch_server: Callable[..., ServerProcess]) -> Callable[..., list[Replica]]:
    """launch_replicas(n, *flags, env=None) -> n ready replicas of `packserve serve --model
    <tiny> --host 127.0.0.1 --port <free>`, started together and waited for (bounded)."""

    def launch(n: int, *flags: str, env: dict[str, str] | None = None) -> list[Replica]:
        replicas = [Replica(launch_server(*flags, env=env, wait=False)) for _ in range(n)]
        for replica in replicas:
            replica.process.wait_ready()
        return replicas

    return launch


@pytest.fixture(scope="session")
def replica(launch_replicas: Callable[..., list[Replica]]) -> Replica:
    """A shared replica with default settings, for tests that only read or add load."""
    (r,) = launch_replicas(1)
    return r


@pytest.fixture(scope="session")
def served_metrics(replica: Replica) -> str:
    """/metrics of the shared replica after a few completions, so every labelled series
    (histograms, prefill counters, request_success_total) has been created."""
    with httpx.Client(base_url=replica.url, timeout=HTTP_TIMEOUT) as client:
        for stream in (False, True):
            body = {"prompt": "Hello there", "max_tokens": 8, "stream": stream}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
        r = client.get("/metrics")
        assert r.status_code == 200
        return r.text


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """tool(name) -> its path, or skip the test saying how to install it."""

    def get(name: str) -> str:
        path = find_tool(name)
        if path is None:
            pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
        return path

    return get


# -- the helpers above, as fixtures (test modules cannot import conftest under importlib) ------


@pytest.fixture(scope="session")
def wait() -> Callable[..., Any]:
    """wait(predicate, timeout, interval=0.1, what=...): bounded polling."""
    return wait_for


@pytest.fixture(scope="session")
def port() -> Callable[[], int]:
    """port() -> a free loopback port."""
    return free_port


@pytest.fixture(scope="session")
def names_in_metrics() -> Callable[[str], set[str]]:
    return sample_names


@pytest.fixture(scope="session")
def total() -> Callable[..., float]:
    """total(url, sample_name, **labels) -> sum of the matching samples of url/metrics."""
    return metric_total


@pytest.fixture(scope="session")
def sse() -> Callable[[Iterable[str]], list[Any]]:
    return parse_sse
