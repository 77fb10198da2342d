"""The kernels a server resolved at start-up (--dtype, --linear-backend auto, --quantization,
the thread count) are in its startup summary and in the packserve:kernel_info metric, and agree."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from packserve.server.launcher import ServerProcess


def test_startup_summary_and_kernel_info_metric_name_the_resolved_kernels(
    launch_server: Callable[..., ServerProcess], model_name: str
) -> None:
    flags = ("--log-format", "json", "--quantization", "int8", "--linear-backend", "auto")
    with launch_server(*flags) as server:
        r = httpx.post(
            server.url + "/v1/completions",
            json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        server.stop()
        records = [json.loads(line) for line in server.logs(tail=None).splitlines()]
    (ready,) = [r for r in records if r["message"] == "engine ready"]
    assert ready["dtype"] == "float32"  # launch_server pins it: what the offline engine uses
    assert ready["quantization"] == "int8"
    assert ready["linear"] in ("onednn", "torch")  # resolved, never "auto"
    assert ready["decode_attention"] in ("sdpa", "matmul", "paged")
    assert ready["threads"] == 1  # launch_server's OMP_NUM_THREADS=1: nothing to tune
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    (sample,) = families["packserve:kernel_info"].samples
    assert sample.value == 1
    assert sample.labels == {
        "model_name": model_name,
        "dtype": "float32",
        "linear_backend": ready["linear"],
        "decode_attention": ready["decode_attention"],
        "quantization": "int8",
        "threads": "1",
    }
    (threads,) = families["packserve:engine_threads"].samples
    assert threads.value == 1
