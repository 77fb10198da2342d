"""bench/serve.py, the serving benchmark's load generator, against a real packserve server:
it counts what was served, and it reports incomplete responses as failures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loadgen():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_counts_every_token_served(loadgen, server, tiny_model_dir):
    tokenizer = loadgen.load_tokenizer(str(tiny_model_dir))
    prompts = loadgen.synthetic_prompts(tokenizer, 6, seed=3, median=40, out_min=4, out_max=24)
    target = loadgen.Target(base_url=server.url, model=None)
    run = loadgen.run_benchmark(target, prompts, tokenizer, max_concurrency=3, progress=False)
    s = run["summary"]
    assert (s["completed"], s["failed"], s["full_length"]) == (6, 0, 6)
    assert s["output_tokens"] == sum(p.max_tokens for p in prompts)
    assert s["tokens_from"] == ["usage"]
    # The server counted the same prompts the generator measured with the same tokenizer.
    assert [r["server_prompt_tokens"] for r in run["requests"]] == [p.prompt_len for p in prompts]
    assert 0 < s["ttft_ms"]["p50"] <= s["e2el_ms"]["p50"]
    assert s["output_throughput"] > 0


def test_reports_truncated_responses_as_failures(loadgen, launch_server, tiny_model_dir):
    # A 64-token context, and max_tokens sent as null (the context left; a sent number past
    # the context would be a 400): the server ends each request with finish_reason "length"
    # below the 40 tokens the generator expects, and the generator must not count them.
    server = launch_server("--max-model-len", "64")
    tokenizer = loadgen.load_tokenizer(str(tiny_model_dir))
    prompts = loadgen.synthetic_prompts(
        tokenizer, 4, seed=5, median=50, sigma=0.01, out_min=40, out_max=40
    )
    target = loadgen.Target(base_url=server.url, model=None, extra_body={"max_tokens": None})
    try:
        run = loadgen.run_benchmark(target, prompts, tokenizer, max_concurrency=2, progress=False)
    finally:
        server.stop()
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (0, 4)
    assert s["output_tokens"] == 0 and s["output_throughput"] == 0
    for r in run["requests"]:
        assert not r["ok"]
        assert r["error"].endswith("tokens with finish_reason='length'"), r["error"]
        assert r["output_tokens"] < 40
