"""A server that cannot start says why and exits non-zero, instead of a live process that
serves nothing: a missing model, a folder without a tokenizer, a KV pool too small for one
sequence or larger than memory, a port already taken, a bad flag."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from packserve.server.launcher import free_port


def serve(*flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKSERVE_")}
    if "PACKSERVE_CACHE_DIR" in os.environ:
        env["PACKSERVE_CACHE_DIR"] = os.environ["PACKSERVE_CACHE_DIR"]
    return subprocess.run(
        [sys.executable, "-m", "packserve.server.cli", "serve", "--port", str(free_port()), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # bounded: a server that stayed up would fail here, not hang the suite
    )


def no_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> str:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return str(folder)


def memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing model", "no model folder at /nonexistent/model"),
        ("no tokenizer", "startup failed"),
        ("pool below one sequence", "cannot hold one sequence"),
        ("pool above memory", "larger than the memory available"),
    ],
)
def test_a_failed_start_exits_1_with_the_cause(
    case: str, message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = {
        "missing model": "/nonexistent/model",
        "no tokenizer": no_tokenizer(tiny_model_dir, tmp_path),
    }
    flags = ["--model", model.get(case, str(tiny_model_dir))]
    if case == "pool below one sequence":
        flags += ["--kv-cache-memory-mb", "2"]
    if case == "pool above memory":
        flags += ["--kv-cache-memory-mb", str(4 * memory_mb())]
    result = serve(*flags)
    assert result.returncode == 1, result.stderr[-2000:]
    failed = [line for line in result.stderr.splitlines() if "startup failed" in line]
    assert len(failed) == 1 and message in failed[0], result.stderr[-2000:]


def test_a_taken_port_fails_before_the_model_loads(tiny_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--model", str(tiny_model_dir), "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "engine ready" not in result.stderr  # it stopped before loading anything


def test_a_bad_flag_is_a_usage_error(tiny_model_dir: Path) -> None:
    result = serve("--model", str(tiny_model_dir), "--prefill-mode", "chunky")
    assert result.returncode == 2 and "invalid choice: 'chunky'" in result.stderr
