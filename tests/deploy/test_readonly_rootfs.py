"""The pod's filesystem, reproduced: packserve serves with the root filesystem read-only and only
$HOME/.cache and a scratch TMPDIR writable (deploy/k8s/deployment.yaml: readOnlyRootFilesystem
with emptyDirs). Needs root and unshare for a private mount namespace; skips otherwise."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import httpx
import pytest


def test_serves_with_a_read_only_root_filesystem(
    tiny_model_dir, start_process, port, wait, tmp_path
):
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare(1) to make a private read-only mount namespace")
    packserve = Path(sys.executable).parent / "packserve"
    home, scratch = tmp_path / "home", tmp_path / "scratch"
    (home / ".cache").mkdir(parents=True)
    scratch.mkdir()
    probe = Path(__file__).resolve().parents[2] / ".readonly-probe"
    listen = port()
    script = f"""
set -e
mount --make-rprivate /
mount -o remount,bind,ro /
mount -t tmpfs -o size=256m tmpfs {home / ".cache"}
mount -t tmpfs -o size=256m tmpfs {scratch}
if touch {probe} 2>/dev/null; then rm -f {probe}; echo "root filesystem still writable"; exit 3; fi
export HOME={home} TMPDIR={scratch} PYTHONDONTWRITEBYTECODE=1
exec {packserve} serve --model {tiny_model_dir} --host 127.0.0.1 --port {listen}
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_")}
    proc = start_process("readonly", [unshare, "--mount", "bash", "-c", script], env=env)
    url = f"http://127.0.0.1:{listen}"

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"exited {proc.proc.returncode}")
        return httpx.get(url + "/ready", timeout=2.0).status_code == 200

    try:
        wait(ready, 90, interval=0.2, what="the read-only server to be ready")
    except AssertionError:
        logs = proc.logs()
        if proc.proc.returncode is not None and "mount" in logs and "permission" in logs.lower():
            pytest.skip(f"mount namespaces are not allowed here: {logs[-300:]}")
        raise AssertionError(f"{shlex.quote(script)}\n{logs}") from None
    body = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60.0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    proc.terminate()
    assert proc.proc.wait(timeout=60) == 0, proc.logs()
    assert "Traceback" not in proc.logs(), proc.logs()
