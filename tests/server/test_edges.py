"""The connection edge under abuse, against real server processes: silent and slowloris
connections are closed, a byte-by-byte body gets 408, an idle flood under a low
file-descriptor limit does not stop /health, and streams whose clients never read are cut
(KV freed, memory bounded) while other requests are served."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from packserve.server.launcher import SERVE_COMMAND, ServerProcess


def connect(server: ServerProcess, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:  # a small receive window: the server's writes back up quickly
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((server.host, server.port))
    return s


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `timeout`."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def edgy(launch_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    with launch_server("--header-timeout", "2", "--body-timeout", "2") as server:
        yield server


def test_silent_and_slowloris_connections_are_closed(edgy: ServerProcess) -> None:
    silent = [connect(edgy) for _ in range(10)]
    slow = [connect(edgy) for _ in range(10)]
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n"  # never finished
    start = time.monotonic()
    for i in range(3):  # a header byte per connection per second, as slowloris does
        for s in slow:
            s.send(request[i : i + 1])
        time.sleep(1)
    assert all(closed_by_server(s, 10) for s in silent + slow)
    assert time.monotonic() - start < 15
    assert httpx.get(edgy.url + "/health", timeout=10).status_code == 200


def test_a_body_sent_byte_by_byte_gets_408(edgy: ServerProcess) -> None:
    body = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()
    s = connect(edgy)
    s.send(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    s.settimeout(10)
    answer = b""
    for byte in body:
        s.send(bytes([byte]))
        time.sleep(0.2)
        try:
            s.setblocking(False)
            answer += s.recv(65536)
        except BlockingIOError:
            pass
        finally:
            s.setblocking(True)
        if answer:
            break
    s.settimeout(10)
    while b"\r\n\r\n" not in answer:
        answer += s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408")
    s.close()


def test_health_answers_through_an_idle_flood_under_a_low_fd_limit(
    launch_server: Callable[..., ServerProcess],
) -> None:
    # 256 descriptors; 300 connections that send nothing (a header timeout long enough that
    # none is closed by it during the test).
    command = ("bash", "-c", 'ulimit -n 256 && exec "$0" "$@"', *SERVE_COMMAND)

    def flood(n: int) -> list[socket.socket]:
        sockets = []
        for _ in range(n):
            try:
                sockets.append(connect(server))
            except OSError:  # the listen backlog may push back; that is fine
                break
        return sockets

    with launch_server("--header-timeout", "60", command=command) as server:
        idle = flood(300)
        for _ in range(5):
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        idle += flood(100)  # and stop within a second of another burst at the cap
        for s in idle:
            s.close()
        server.stop()
        log = server.logs(tail=None)
    # A burst at the cap runs out of descriptors for a few loop turns, until the evictions
    # free them: asyncio never hears of it (it would log, pause accepting for a second, and
    # log a ValueError per pending connection if it stopped in that second).
    lines = log.splitlines()
    assert not any("out of system resource" in line for line in lines)
    assert sum("connection evicted" in line for line in lines) <= 21
    assert len(log) < 200_000


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def test_streams_nobody_reads_are_cut_and_their_kv_freed(
    launch_server: Callable[..., ServerProcess], tiny_model_dir: Path
) -> None:
    with launch_server("--stall-timeout", "3", "--max-num-seqs", "64") as server:
        assert server.proc is not None
        warm = {"prompt": "warm up", "max_tokens": 4}
        httpx.post(server.url + "/v1/completions", json=warm, timeout=60)
        before = _rss_kib(server.proc.pid)
        body = json.dumps(
            {
                "prompt": "Tell me everything",
                "max_tokens": 1000,
                "n": 4,
                "logprobs": 20,
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        readers = [connect(server, rcvbuf=4096) for _ in range(8)]
        for s in readers:
            s.send(head + body)  # and never read
        peak = before
        deadline = time.monotonic() + 60
        running = None
        while time.monotonic() < deadline:
            peak = max(peak, _rss_kib(server.proc.pid))
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            running = _gauge(metrics, "packserve:num_requests_running")
            if running == 0 and time.monotonic() > deadline - 55:
                break
            time.sleep(0.2)
        assert running == 0  # every stream was cut and its sequences aborted
        assert _gauge(metrics, "packserve:kv_cache_usage_perc") == 0
        generated = _gauge(metrics, "packserve:generation_tokens_total")
        assert generated < 8 * 4 * 1000 / 2  # far less than the streams asked for
        # Meanwhile and after, a well-behaved client is served.
        ok = httpx.post(server.url + "/v1/completions", json=warm, timeout=60)
        assert ok.status_code == 200
        for s in readers:
            s.close()
    # RSS grows by the KV pool's pages the sequences first touched (the pool is allocated
    # lazily), at most a block per sequence beyond its tokens; everything else (buffered
    # deltas, socket buffers) must stay small. Without the bounds it is the whole response,
    # megabytes per stream.
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    kv_mib = (generated + 32 * (16 + 16)) * kv_per_token / 2**20
    growth_mib = (peak - before) / 1024
    assert growth_mib < kv_mib + 24, f"RSS grew {growth_mib:.0f} MiB, {kv_mib:.0f} of it KV"


def _gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
