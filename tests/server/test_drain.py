"""SIGTERM drains: /ready turns 503, new requests get 503, running streams finish whole,
and the process exits 0.

The module's server is fresh when the first test runs (nothing served yet) and is ended by
the SIGTERM test, which therefore comes last.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess

import httpx
import pytest

from packserve.scheduler import SamplingParams

P = "packserve:"
N_STREAMS = 8
MAX_TOKENS = 64
ANCHOR_TOKENS = 500  # one long stream keeps the drain open while the checks run
TIMEOUT = httpx.Timeout(90.0, connect=10.0)


@pytest.fixture(scope="module")
def drain_server(launch_server):
    server = launch_server("--shutdown-timeout", "60")
    yield server
    server.stop()


def test_fresh_server_exports_its_gauges(drain_server, model_name):
    """Before any request, the gauges are already there, 0, labelled with the model name
    (autoscalers read num_requests_waiting before the first request arrives)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(drain_server.url + "/metrics", timeout=30.0)
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for short in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        family = families.get(P + short)
        assert family is not None, short
        values = {s.labels.get("model_name"): s.value for s in family.samples}
        assert values == {model_name: 0.0}, (short, values)


async def _stream(client: httpx.AsyncClient, body: dict, first: asyncio.Event, parse_sse):
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=payload) as r:
        status = r.status_code
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if line.startswith("data: "):
                first.set()
    return status, parse_sse(lines)


async def _drain_scenario(server, bodies, parse_sse, error_body):
    limits = httpx.Limits(max_connections=2 * len(bodies) + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
        firsts = [asyncio.Event() for _ in bodies]
        tasks = [
            asyncio.create_task(_stream(client, b, f, parse_sse))
            for b, f in zip(bodies, firsts, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
        assert not any(t.done() for t in tasks[-1:])  # the anchor is still streaming

        server.proc.send_signal(signal.SIGTERM)

        # readiness goes 503 at once (bounded poll in case the signal is handled late)
        for _ in range(100):
            ready = await client.get("/ready")
            if ready.status_code == 503:
                break
            assert ready.status_code == 200
            await asyncio.sleep(0.1)
        error_body(ready, 503, "service_unavailable")
        # liveness stays 200: the process is healthy, just leaving
        assert (await client.get("/health")).status_code == 200
        # new work is refused with an OpenAI error body
        new = {"prompt": "too late", "max_tokens": 2}
        error_body(await client.post("/v1/completions", json=new), 503, "service_unavailable")
        error_body(
            await client.post("/v1/completions", json={**new, "stream": True}),
            503,
            "service_unavailable",
        )
        chat = {"messages": [{"role": "user", "content": "too late"}], "max_tokens": 2}
        error_body(await client.post("/v1/chat/completions", json=chat), 503)
        error_body(await client.get("/v1/models"), 503)
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)


def test_sigterm_drains_running_streams_and_exits_0(drain_server, engine, parse_sse, error_body):
    prompts = [f"Drain stream number {i}: keep going" for i in range(N_STREAMS)]
    expected = engine.generate(
        prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    bodies = [
        {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        for p in prompts
    ]
    bodies.append({"prompt": "anchor", "max_tokens": ANCHOR_TOKENS, "ignore_eos": True})

    results = asyncio.run(_drain_scenario(drain_server, bodies, parse_sse, error_body))

    for i, (status, events) in enumerate(results):
        assert status == 200, i
        assert events[-1] == "[DONE]", (i, events[-3:])
        chunks = events[:-1]
        assert not any("error" in c for c in chunks), i
        usage = chunks[-1]
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == bodies[i]["max_tokens"], i
        choices = [c["choices"][0] for c in chunks[:-1]]
        assert choices[-1]["finish_reason"] == "length", i
        if i < N_STREAMS:
            assert "".join(c["text"] for c in choices) == expected[i].text, i

    try:
        code = drain_server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 60 s of draining:\n" + drain_server.logs())
    assert code == 0, drain_server.logs()
