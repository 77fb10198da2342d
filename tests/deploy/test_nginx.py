"""Two real replicas behind Debian's nginx running deploy/nginx/packserve.conf (only its ports
and log path changed): requests spread over both, and SIGTERM to one replica under load loses
nothing: its in-flight streams finish, new requests go to the other, every request is a 200
with all its tokens."""

from __future__ import annotations

import grp
import os
import re
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "packserve.conf"
STREAM_TOKENS = 300  # long enough that streams are mid-way when SIGTERM lands
SHORT_TOKENS = 16
LOG_LINE = re.compile(
    r'"(?P<request>[^"]*)" (?P<status>\d+) \d+ upstream=(?P<upstream>.*?) '
    r"upstream_status=(?P<upstream_status>.*?) request_time=\S+ request_id=(?P<id>\S+)"
)


@dataclass
class Balanced:
    url: str
    replicas: list[Any]
    access_log: Path
    nginx: Any

    def log(self) -> dict[str, dict[str, Any]]:
        """request id -> {status, upstreams: [addr...], upstream_statuses: [...]}."""
        out = {}
        for line in self.access_log.read_text().splitlines():
            m = LOG_LINE.search(line)
            if m and m["id"] != "-":
                out[m["id"]] = {
                    "status": int(m["status"]),
                    "upstreams": [a.strip() for a in m["upstream"].split(",")],
                    "upstream_statuses": [s.strip() for s in m["upstream_status"].split(",")],
                }
        return out


def runnable_copy(shipped: str, listen: int, upstreams: list[int], access_log: Path) -> str:
    """The shipped config with the test's ports and log path; fails if the directives it
    replaces are not there as shipped."""
    conf = shipped
    for shipped_port, port in zip((8001, 8002), upstreams, strict=True):
        old = f"server 127.0.0.1:{shipped_port} "
        assert conf.count(old) == 1, old
        conf = conf.replace(old, f"server 127.0.0.1:{port} ")
    assert conf.count("listen 8000;") == 1
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    old_log = "access_log /var/log/nginx/packserve.access.log packserve;"
    assert conf.count(old_log) == 1
    return conf.replace(old_log, f"access_log {access_log} packserve;")


def nobody_group() -> str:
    """Debian calls the unprivileged group nogroup, other systems nobody."""
    for name in ("nogroup", "nobody"):
        try:
            grp.getgrnam(name)
            return name
        except KeyError:
            continue
    return "nobody"


@pytest.fixture(scope="module")
def balanced(tool, replica, launch_replicas, start_process, port, wait) -> Any:
    """nginx over two replicas: a fresh one (the one the drain test stops; a long shutdown
    timeout, so the drain and not the timer ends its streams) and the shared one."""
    nginx = tool("nginx")
    (fresh,) = launch_replicas(1, "--shutdown-timeout", "60")
    replicas = [fresh, replica]
    # nginx's workers may run as another user (root starts them as nobody): a world-readable
    # folder of our own, removed at the end.
    with tempfile.TemporaryDirectory(prefix="packserve-nginx-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        access_log = tmp / "access.log"
        last_logs = ""
        for _ in range(3):  # the free port may be taken before nginx binds it
            listen = port()
            conf = runnable_copy(
                SHIPPED.read_text(), listen, [r.port for r in replicas], access_log
            )
            (tmp / "packserve.conf").write_text(conf)
            user = f"user nobody {nobody_group()};\n" if os.geteuid() == 0 else ""
            (tmp / "nginx.conf").write_text(
                f"{user}daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
                f"error_log {tmp}/error.log info;\nevents {{ worker_connections 512; }}\n"
                "http {\n"
                + "".join(
                    f"    {kind}_temp_path {tmp}/{kind}_temp;\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
                )
                + f"    include {tmp}/packserve.conf;\n}}\n"
            )
            argv = [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", f"{tmp}/error.log"]
            proc = start_process("nginx", argv)
            url = f"http://127.0.0.1:{listen}"

            def up(proc: Any = proc, url: str = url) -> bool:
                if not proc.alive():
                    raise RuntimeError("nginx exited")
                return httpx.get(url + "/ready", timeout=2.0).status_code == 200

            try:
                wait(up, 15, interval=0.1, what="nginx to proxy /ready")
            except AssertionError:
                error_log = tmp / "error.log"
                last_logs = proc.logs() + (error_log.read_text() if error_log.exists() else "")
                proc.stop(timeout=5)
                continue
            yield Balanced(url, replicas, access_log, proc)
            proc.stop(timeout=10)
            fresh.process.stop(timeout=10)
            return
        pytest.fail(f"nginx did not start:\n{last_logs}")


# -- a client that records everything ----------------------------------------------------------


@dataclass
class Outcome:
    request_id: str
    stream: bool
    max_tokens: int
    status: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # [DONE] seen (streams) / whole JSON body (non-streamed)
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0
    first_chunk: threading.Event = field(default_factory=threading.Event)

    @property
    def ok(self) -> bool:
        return (
            self.status == 200
            and self.done
            and self.completion_tokens == self.max_tokens
            and self.finish_reason == "length"
            and self.error is None
        )


def request(url: str, max_tokens: int, stream: bool, parse_sse: Any) -> Outcome:
    """One completion through `url` with a fresh X-Request-Id; never raises."""
    out = Outcome(uuid.uuid4().hex, stream, max_tokens, started=time.monotonic())
    body: dict[str, Any] = {
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"X-Request-Id": out.request_id}
    try:
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            if not stream:
                r = client.post(url + "/v1/completions", json=body, headers=headers)
                out.status = r.status_code
                if r.status_code == 200:
                    data = r.json()
                    out.completion_tokens = data["usage"]["completion_tokens"]
                    out.finish_reason = data["choices"][0]["finish_reason"]
                    out.done = True
                else:
                    out.error = r.text[:300]
            else:
                with client.stream(
                    "POST", url + "/v1/completions", json=body, headers=headers
                ) as r:
                    out.status = r.status_code
                    lines = []
                    for line in r.iter_lines():
                        lines.append(line)
                        if line.startswith("data: "):
                            out.first_chunk.set()
                    events = parse_sse(lines)
                    out.done = bool(events) and events[-1] == "[DONE]"
                    for event in events:
                        if not isinstance(event, dict):
                            continue
                        if "error" in event:
                            out.error = str(event["error"])
                        for choice in event.get("choices", []):
                            out.finish_reason = choice.get("finish_reason") or out.finish_reason
                        if event.get("usage"):
                            out.completion_tokens = event["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - recorded and asserted on
        out.error = repr(exc)
    finally:
        out.first_chunk.set()
        out.ended = time.monotonic()
    return out


def requests_total(total: Any, url: str) -> float:
    return total(url, "packserve:request_success_total")


# -- the tests ----------------------------------------------------------------------------------


def test_nginx_spreads_requests_over_both_replicas(balanced, total, sse):
    before = [requests_total(total, r.url) for r in balanced.replicas]
    outcomes = [request(balanced.url, SHORT_TOKENS, n % 2 == 1, sse) for n in range(8)]
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    after = [requests_total(total, r.url) for r in balanced.replicas]
    moved = [a - b for a, b in zip(after, before, strict=True)]
    assert all(m >= 1 for m in moved), f"requests per replica: {moved}"
    assert sum(moved) == len(outcomes)
    log = balanced.log()
    used = {log[o.request_id]["upstreams"][-1] for o in outcomes}
    assert used == {r.address for r in balanced.replicas}


def test_sigterm_one_replica_under_load_loses_nothing(balanced, total, sse, wait):
    a, b = balanced.replicas
    b_before = requests_total(total, b.url)
    with ThreadPoolExecutor(8) as pool:
        # Long streams through nginx; least_conn puts about half on each replica.
        streams = [pool.submit(request, balanced.url, STREAM_TOKENS, True, sse) for _ in range(6)]

        def a_busy() -> bool:
            return total(a.url, "packserve:num_requests_running") >= 1

        wait(a_busy, 30, interval=0.05, what="streams running on the replica to stop")
        sigterm_at = time.monotonic()
        a.process.terminate()

        # New traffic while the replica drains and after it is gone: two clients, one request
        # after the other, short streamed and non-streamed completions.
        stop = threading.Event()

        def client(n: int) -> list[Outcome]:
            done = []
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                done.append(request(balanced.url, SHORT_TOKENS, (len(done) + n) % 2 == 0, sse))
            return done

        clients = [pool.submit(client, n) for n in range(2)]

        # The replica drains: not ready, still running its streams.
        wait(
            lambda: httpx.get(a.url + "/ready", timeout=2.0).status_code == 503,
            10,
            interval=0.05,
            what="the draining replica's /ready to answer 503",
        )
        exit_code = a.process.proc.wait(timeout=70)
        exited_at = time.monotonic()
        time.sleep(1.0)  # traffic continues a moment after the replica is gone
        stop.set()
        after = [o for c in clients for o in c.result(timeout=70)]
        in_flight = [s.result(timeout=70) for s in streams]

    assert exit_code == 0, a.process.logs()
    failed = [o for o in in_flight + after if not o.ok]
    assert not failed, failed

    log = balanced.log()
    # The replica's own streams ran across the SIGTERM and finished complete.
    on_a = [o for o in in_flight if log[o.request_id]["upstreams"] == [a.address]]
    assert on_a, "no stream was running on the SIGTERMed replica"
    assert all(o.ended > sigterm_at for o in on_a)
    assert max(o.ended for o in on_a) <= exited_at + 0.5
    # Every new request was answered by the other replica, some after being passed on
    # from the draining one (503) or the stopped one (connection refused: 502 in the log).
    assert len(after) >= 4
    finals = {log[o.request_id]["upstreams"][-1] for o in after}
    assert finals == {b.address}, finals
    passed_on = [o for o in after if len(log[o.request_id]["upstreams"]) > 1]
    assert passed_on, "no request was passed on from the stopped replica"
    for o in passed_on:
        entry = log[o.request_id]
        assert entry["upstreams"] == [a.address, b.address], entry
        assert entry["upstream_statuses"][0] in ("503", "502"), entry
    on_b = len(in_flight) - len(on_a) + len(after)
    assert requests_total(total, b.url) - b_before == on_b
