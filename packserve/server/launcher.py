"""Start `packserve serve` as a child process and wait until it is ready: the one harness the
tests, the benchmarks and deploy/ci use.

    with launch("--max-num-seqs", "8", threads=1) as server:
        httpx.get(server.url + "/v1/models")

Standard library and httpx only, so a client-side script can use it without torch. Every
wait is bounded; a server that exits or never becomes ready raises `ServerStartError` with the
tail of its log. The log (stdout and stderr together) goes to a file, never to a pipe: a pipe
nobody reads fills up and blocks the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

HOST = "127.0.0.1"
# Importing torch and loading (or first building) the model on a busy 2-core machine.
READY_TIMEOUT_S = 120.0
SERVE_COMMAND = (sys.executable, "-m", "packserve.server.cli", "serve")
# Inherited from the caller's environment although it starts with PACKSERVE_: where models
# live, not a server setting.
KEPT_ENV = frozenset({"PACKSERVE_CACHE_DIR"})
PORT_ATTEMPTS = 3  # a free port can be taken between the probe and the server's bind
LOG_TAIL = 4000  # characters of the log in an error message


class ServerStartError(RuntimeError):
    """The server exited before it was ready, or was not ready in time."""


class _PortTaken(ServerStartError):
    """Another process answers on the server's port (it took the port first)."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listener_is_foreign(port: int, pid: int) -> bool:
    """Whether the TCP listener on `port` belongs to neither `pid` nor its descendants.
    Linux only (/proc); False wherever that cannot be told. A ready answer on a port a
    starting server has not bound yet would otherwise be taken for its own."""
    listeners: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address(hex ip:hex port) rem_address st(0A = LISTEN) ... uid timeout inode
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                listeners.add(fields[9])
    if not listeners:
        return False
    ours: set[str] = set()
    pending = [str(pid)]
    while pending:
        p = pending.pop()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{p}/fd/{fd}")  # socket:[inode]
                    if link.startswith("socket:["):
                        ours.add(link[len("socket:[") : -1])
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    pending += Path(f"/proc/{p}/task/{task}/children").read_text().split()
    return not listeners & ours


class ServerProcess:
    """One server child process: `command` (by default `python -m packserve.server.cli serve`)
    followed by `--host HOST --port PORT` and `flags`.

    The child's environment is this process's minus every `PACKSERVE_*` variable (a setting in
    the caller's shell must not change what is measured or tested), plus `env`. `threads` sets
    OMP_NUM_THREADS, the server's intra-op thread count. With `port` None a free port is picked,
    and another one if the server finds it taken. Without `log_path` the log is a new temporary
    file, left in place after `stop()` (readable, and the caller's to delete).
    """

    def __init__(
        self,
        flags: Sequence[str] = (),
        *,
        command: Sequence[str] = SERVE_COMMAND,
        env: Mapping[str, str] | None = None,
        threads: int | None = None,
        host: str = HOST,
        port: int | None = None,
        log_path: str | Path | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        ready_path: str = "/ready",
        cwd: str | Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.flags = tuple(flags)
        self.command = tuple(command)
        self.host = host
        self.ready_timeout = ready_timeout
        self.ready_path = ready_path
        self.cwd = cwd
        self.new_session = new_session
        self._fixed_port = port
        self.port = port if port is not None else 0  # chosen by spawn()
        self._env = {
            k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_") or k in KEPT_ENV
        }
        self._env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file at once
        if threads is not None:
            self._env["OMP_NUM_THREADS"] = str(threads)
        self._env.update(env or {})
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="packserve-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def argv(self) -> list[str]:
        return [*self.command, "--host", self.host, "--port", str(self.port), *self.flags]

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> ServerProcess:
        """Spawn the process; with `wait`, also `wait_ready()`. Returns self."""
        self.spawn()
        if wait:
            self.wait_ready()
        return self

    def spawn(self) -> None:
        """Start the process (on a fresh free port unless one was given); does not wait."""
        if self.alive():
            raise RuntimeError(f"{self.url}: already running")
        if self._fixed_port is None:
            self.port = free_port(self.host)
        # A fresh log: after a port clash, the failed attempt's traceback is no server error.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll GET `ready_path` until 200 (bounded by `timeout`, default `ready_timeout`).
        A server that lost its port to another process is restarted on a new one (up to
        PORT_ATTEMPTS in all); any other exit, or the deadline, raises ServerStartError and
        stops the process."""
        timeout = self.ready_timeout if timeout is None else timeout
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._poll_ready(timeout)
                return
            except ServerStartError as exc:
                clash = isinstance(exc, _PortTaken) or (
                    "address already in use" in self.logs().lower()
                )
                self.stop(timeout=10)
                if not clash or self._fixed_port is not None or attempt == PORT_ATTEMPTS:
                    raise
                self.spawn()

    def _poll_ready(self, timeout: float) -> None:
        if self.proc is None:
            raise RuntimeError("wait_ready() before spawn()")
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(timeout=httpx.Timeout(3.0)) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    what = f"exited with {code} before it was ready"
                    raise ServerStartError(self._describe(what))
                try:
                    r = client.get(self.url + self.ready_path)
                    if r.status_code == 200:
                        if _listener_is_foreign(self.port, self.proc.pid):
                            what = f"found port {self.port} served by another process"
                            raise _PortTaken(self._describe(what))
                        return
                    last = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                if time.monotonic() >= deadline:
                    what = f"not ready after {timeout:.0f} s (last answer: {last})"
                    raise ServerStartError(self._describe(what))
                time.sleep(0.2)

    def _describe(self, what: str) -> str:
        return f"server {' '.join(self.argv)} {what}; log {self.log_path}, its tail:\n" + self.logs(
            tail=LOG_TAIL
        )

    def logs(self, tail: int | None = LOG_TAIL) -> str:
        """The last `tail` characters of the log (all of it with None); "" if unreadable."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    def terminate(self) -> None:
        """Send SIGTERM (packserve then drains) and return at once."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; the process is reaped. Returns its
        exit status (None if even SIGKILL left it running: nothing more can be done)."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerProcess({self.url}, flags={self.flags}, returncode={self.returncode})"


def launch(*flags: str, **options: Any) -> ServerProcess:
    """A started, ready `ServerProcess(flags, **options)` (its keyword arguments); stop it
    with `stop()` or a `with`."""
    return ServerProcess(flags, **options).start()
