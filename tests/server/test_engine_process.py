"""The engine loop in its own process (the default) and in a thread of the server
(`--no-engine-process`): the same answers; a dead engine process is reported, not hidden; a
SIGTERM that reaches the engine process too (a whole process group signalled) still drains."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from packserve.server.launcher import ServerProcess

PROMPTS = ["The engine process answers", "and so does the thread", "x y z"]


def engine_child(server: ServerProcess) -> int:
    """The pid of the server's engine process (the child multiprocessing spawned; its other
    child is multiprocessing's resource tracker)."""
    assert server.proc is not None
    pid = server.proc.pid
    children = [
        int(c)
        for task in os.listdir(f"/proc/{pid}/task")
        for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
    ]
    engines = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(engines) == 1, children
    return engines[0]


def answers(url: str, parse_sse) -> list[tuple[str, str]]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            r = client.post("/v1/completions", json=body | {"stream": True})
            events = parse_sse(r.text.splitlines())
            streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
            out.append((whole, streamed))
    return out


def test_thread_and_process_engines_answer_alike(server, launch_server, parse_sse) -> None:
    thread = launch_server("--no-engine-process")
    try:
        in_thread = answers(thread.url, parse_sse)
    finally:
        thread.stop()
    in_process = answers(server.url, parse_sse)
    assert in_process == in_thread
    assert all(whole == streamed and whole for whole, streamed in in_process)


def test_a_killed_engine_process_ends_streams_with_an_error_and_fails_health(
    launch_server, parse_sse
) -> None:
    server = launch_server()
    body = {"prompt": "run long", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"text"' in first
            os.kill(engine_child(server), signal.SIGKILL)
            events = parse_sse(list(lines))
        assert any("engine process exited" in str(e.get("error", "")) for e in events[:-1])
        assert events[-1] == "[DONE]"
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
        assert r.status_code == 503
    assert "the engine process exited" in server.logs()


def test_sigterm_to_the_whole_group_still_drains(
    launch_server, parse_sse, metrics, metric, wait_for
) -> None:
    server = launch_server()
    body = {"prompt": "drain me", "max_tokens": 64, "ignore_eos": True, "stream": True}
    got: list[object] = []

    def stream() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            got.extend(parse_sse(client.post("/v1/completions", json=body).text.splitlines()))

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(
        lambda: metric(metrics(server.url), "packserve:num_requests_running") == 1,
        30,
        0.02,
        "the stream to run",
    )
    child = engine_child(server)
    assert server.proc is not None
    for pid in (child, server.proc.pid):  # what `kill -TERM -<pgid>` or systemd would send
        os.kill(pid, signal.SIGTERM)
    reader.join(120)
    assert got and got[-1] == "[DONE]"
    texts = [c for e in got[:-1] if isinstance(e, dict) for c in e["choices"]]
    assert texts and texts[-1]["finish_reason"] == "length"
    try:
        assert server.proc.wait(timeout=60) == 0, server.logs()
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit after draining:\n" + server.logs())


def environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


def test_the_engine_process_threads_spin_a_bounded_while_unless_told(server, launch_server) -> None:
    child = environment(engine_child(server))
    assert (child.get("OMP_WAIT_POLICY"), child.get("GOMP_SPINCOUNT")) == ("ACTIVE", "30000")
    told = launch_server(env={"OMP_WAIT_POLICY": "PASSIVE"})  # the operator's choice stands
    try:
        child = environment(engine_child(told))
        assert child["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in child
    finally:
        told.stop()
