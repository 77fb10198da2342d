"""Fixtures for the dashboard tests: one real `packserve serve` on a loopback port (started by
tests/conftest.py's `launch_server`: tiny model, an API key set, a small context and KV pool so
rows, queue and cache all move), a load generator that sends completions in waves of varied
prompt lengths, and bounded polling.

Everything that waits has a bound, so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from packserve.server.launcher import ServerProcess

API_KEY = "dashboard-test-key"
CANARY = "zebracanary"  # in every text prompt: must never show up in the feed
SERVER_FLAGS = (
    "--max-model-len",
    "256",  # the row capacity: prompts of up to ~200 tokens make several rows per step
    "--max-num-seqs",
    "16",
    "--max-num-batched-tokens",
    "512",  # a wave (~1200 prompt tokens) takes several steps to admit: a queue forms
    "--kv-cache-memory-mb",
    "16",  # a small pool, so KV usage is visibly above zero
    "--packing-window-ms",
    "20",
)


@dataclass
class Server:
    """The dashboard's server and what the tests know about it."""

    process: ServerProcess
    api_key: str = API_KEY
    canary: str = CANARY  # a word in text prompts that must never reach the feed

    @property
    def url(self) -> str:
        return self.process.url

    def logs(self, tail: int = 4000) -> str:
        return self.process.logs(tail)


@pytest.fixture(scope="session")
def dash_server(launch_server: Callable[..., ServerProcess]) -> Iterator[Server]:
    """`packserve serve` with the tiny model, the flags above and an API key."""
    process = launch_server(*SERVER_FLAGS, "--api-key", API_KEY)
    yield Server(process)
    process.stop()


@dataclass
class Load:
    """Completions from several threads until stopped (or `max_s` passed). The clients send
    in waves, on a shared tick, so each wave's prompts are prefilled together and FFD has
    something to pack (a steady trickle would be prefilled one prompt per step)."""

    url: str
    wave_clients: int = 12
    steady_clients: int = 0
    period_s: float = 1.5
    max_s: float = 100.0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        deadline = time.monotonic() + self.max_s
        for i in range(self.wave_clients + self.steady_clients):
            wave = i < self.wave_clients
            t = threading.Thread(target=self._client, args=(i, wave, deadline), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _client(self, i: int, wave: bool, deadline: float) -> None:
        rng = random.Random(i)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=60.0) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if wave:  # sleep to the next tick, shared by all wave clients
                    self.stop.wait(self.period_s - time.monotonic() % self.period_s)
                    if self.stop.is_set():
                        break
                n = rng.choice([rng.randint(4, 40), rng.randint(30, 120), rng.randint(100, 200)])
                if rng.random() < 0.3:  # text, with the canary word in it
                    prompt: Any = f"{CANARY} " + " ".join(["once upon a time"] * max(1, n // 5))
                else:
                    prompt = [rng.randrange(16, 8000) for _ in range(n)]
                body = {"prompt": prompt, "max_tokens": rng.randint(16, 48), "ignore_eos": True}
                try:
                    r = client.post("/v1/completions", json=body)
                    error = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    error = repr(exc)
                with self._lock:
                    if error is None:
                        self.ok += 1
                    else:
                        self.errors.append(error)


@pytest.fixture(scope="session")
def load(dash_server: Server) -> Iterator[Load]:
    """Load running for the whole session (the feed and the page are checked under it)."""
    running = Load(dash_server.url).start()
    yield running
    running.close()


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Any]:
    """wait_for(predicate, timeout, what): poll until truthy (returned) or fail."""
    return _wait_for
