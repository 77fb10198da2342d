"""429 with Retry-After once more than --max-queued-requests wait; admitted requests finish
correctly; the queue frees up again."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

CMPL = "/v1/completions"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@pytest.fixture(scope="module")
def small_queue(launch_server):
    server = launch_server("--max-queued-requests", "2", "--max-num-seqs", "1")
    yield server
    server.stop()


def _assert_429(r: httpx.Response, error_body) -> None:
    error = error_body(r, 429, "rate_limit_error")
    assert error["message"]
    retry_after = r.headers.get("retry-after")
    assert retry_after is not None, r.headers
    assert int(retry_after) >= 1


async def _waiting(client: httpx.AsyncClient, model_name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "packserve:num_requests_waiting" and s.labels["model_name"] == model_name:
                return s.value
    return 0.0


async def _queue_full_scenario(url: str, model_name: str, error_body, offline) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
        # A occupies the only running slot ...
        first_chunk = asyncio.Event()

        async def stream_a() -> None:
            body = {"prompt": "A", "max_tokens": 1900, "ignore_eos": True, "stream": True}
            async with client.stream("POST", CMPL, json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        first_chunk.set()

        a = asyncio.create_task(stream_a())
        await asyncio.wait_for(first_chunk.wait(), 30)
        # ... B and C fill the queue of 2 ...
        queued = {
            p: {"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            for p in ("Queued B", "Queued C")
        }
        waiting = [asyncio.create_task(client.post(CMPL, json=b)) for b in queued.values()]
        for _ in range(100):  # bounded: up to ~10 s
            if await _waiting(client, model_name) == 2:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the two queued requests never showed as waiting")
        # ... so anything more is refused at once, streamed or not, chat or not
        d = {"prompt": "D", "max_tokens": 4}
        _assert_429(await client.post(CMPL, json=d), error_body)
        _assert_429(await client.post(CMPL, json={**d, "stream": True}), error_body)
        chat = {"messages": [{"role": "user", "content": "D"}], "max_tokens": 4}
        _assert_429(await client.post("/v1/chat/completions", json=chat), error_body)
        # A leaves; B and C get their turn and finish with the right text
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
        results = await asyncio.wait_for(asyncio.gather(*waiting), 60)
        for prompt, r in zip(queued, results, strict=True):
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["text"] == offline(prompt, 12, ignore_eos=True).text
            assert out["usage"]["completion_tokens"] == 12
        # and the queue takes requests again
        r = await client.post(CMPL, json=d)
        assert r.status_code == 200, r.text


def test_queue_full_gives_429_then_recovers(small_queue, model_name, error_body, offline):
    for p in ("Queued B", "Queued C"):
        offline(p, 12, ignore_eos=True)  # before the server gets busy
    asyncio.run(
        asyncio.wait_for(
            _queue_full_scenario(small_queue.url, model_name, error_body, offline), 150
        )
    )


async def _burst(url: str, model_name: str, bodies: list[dict[str, Any]]):
    """Fire all bodies at once; meanwhile sample the waiting gauge. (responses, peak)"""
    limits = httpx.Limits(max_connections=len(bodies) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        done = asyncio.Event()
        peak = 0.0

        async def sample() -> None:
            nonlocal peak
            for _ in range(3000):  # bounded; ends with the burst
                peak = max(peak, await _waiting(client, model_name))
                if done.is_set():
                    return
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            responses = await asyncio.wait_for(
                asyncio.gather(*(client.post(CMPL, json=b) for b in bodies)), 150
            )
        finally:
            done.set()
            await asyncio.wait_for(sampler, 30)
        return responses, peak


def test_burst_gets_some_429s_and_the_rest_finish(small_queue, model_name, error_body, offline):
    prompts = [f"Burst {i} of the queue test" for i in range(12)]
    bodies = [
        {"prompt": p, "max_tokens": 48, "temperature": 0, "ignore_eos": True} for p in prompts
    ]
    results, peak = asyncio.run(_burst(small_queue.url, model_name, bodies))
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1, f"{statuses}; peak num_requests_waiting {peak}"
    assert statuses.count(200) >= 1, statuses
    assert peak <= 2, f"num_requests_waiting reached {peak} with --max-queued-requests 2"
    for p, r in zip(prompts, results, strict=True):
        if r.status_code == 429:
            _assert_429(r, error_body)
        else:
            out = r.json()
            assert out["choices"][0]["text"] == offline(p, 48, ignore_eos=True).text
            assert out["usage"]["completion_tokens"] == 48
