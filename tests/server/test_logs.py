"""With --log-format json every line the server writes is one JSON object: its own records,
uvicorn's, and the libraries' (no progress bars); the start is summarised in one record and
each request in another."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx

from packserve.server.launcher import ServerProcess


def test_json_logs_are_json_only(
    launch_server: Callable[..., ServerProcess], tiny_model_dir: Path
) -> None:
    with launch_server("--log-format", "json") as server:
        r = httpx.post(
            server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200
        server.stop()
        lines = server.logs(tail=None).splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
    ready = [r for r in records if r["message"] == "engine ready"]
    assert len(ready) == 1
    assert ready[0]["model"] == tiny_model_dir.name and ready[0]["max_model_len"] > 0
    assert ready[0]["num_kv_blocks"] > 0 and ready[0]["dtype"] == "float32"
    # What was loaded before serving is frozen out of the collector's scans (no full-collection
    # pauses of every stream): at least the torch and transformers modules' objects.
    assert ready[0]["gc_frozen_objects"] > 50_000
    finished = [r for r in records if r["message"] == "request finished"]
    assert len(finished) == 1 and finished[0]["output_tokens"] == 2
