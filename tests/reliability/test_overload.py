"""Overload: with a small --max-queued-requests, a burst of mixed requests gets 429s with
Retry-After that come back fast (faster than any admitted request completes), while every
admitted request finishes exactly (equal to its prompt run alone offline); afterwards the
queue takes requests again and nothing is left running.

tests/server/test_queue_limit.py covers the basic 429 and the waiting-gauge bound; this adds
streamed and chat requests to the burst, token-exactness of the admitted ones and the
latency comparison."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import httpx
import pytest

QUEUE = 4
BURST = 40
MAX_TOKENS = 128  # an admitted request takes >= 128 engine steps


@pytest.fixture(scope="module")
def small_queue(launch):
    server = launch("--max-queued-requests", str(QUEUE), "--max-num-seqs", "2")
    yield server
    server.stop()


def _burst(chat_ids, tok) -> list[dict[str, Any]]:
    rng = random.Random(429)
    reqs = []
    for i in range(BURST):
        body: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        if i % 3 == 2:
            messages = [{"role": "user", "content": f"Burst chat {i} " + "x " * rng.randint(0, 9)}]
            body |= {"messages": messages, "logprobs": True, "top_logprobs": 0}
            path, ids = "/v1/chat/completions", chat_ids(messages)
        else:
            prompt = f"Burst {i}: " + "more " * rng.randint(0, 30)
            body |= {"prompt": prompt, "logprobs": 0}
            path, ids = "/v1/completions", list(tok(prompt).input_ids)
        reqs.append({"path": path, "body": body, "ids": ids, "stream": i % 2 == 0})
    return reqs


async def _fire(url: str, reqs: list[dict[str, Any]], h) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=BURST + 4, max_keepalive_connections=BURST + 4)
    async with httpx.AsyncClient(base_url=url, timeout=h.HTTP_TIMEOUT, limits=limits) as client:

        async def one(r: dict[str, Any]) -> dict[str, Any]:
            start = time.monotonic()
            if r["stream"]:
                status, events = await h.stream(client, r["path"], r["body"])
                out = {"status": status, "events": events, "headers": {}}
                if status != 200:  # the refusal's JSON body (its headers: a test below)
                    out["body"] = events[0]
            else:
                resp = await client.post(r["path"], json=r["body"])
                out = {"status": resp.status_code, "body": resp.json(), "headers": resp.headers}
            out["seconds"] = time.monotonic() - start
            return out

        return await asyncio.gather(*(one(r) for r in reqs))


def _tokens_and_text(path: str, result: dict[str, Any], h) -> tuple[list[str], str, int]:
    if "events" in result and result["status"] == 200:
        events = result["events"]
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        got = h.completion_tokens(path, events[:-1])[0]
        return got["tokens"], got["text"], events[-2]["usage"]["completion_tokens"]
    choice = result["body"]["choices"][0]
    if path == "/v1/completions":
        return (
            choice["logprobs"]["tokens"],
            choice["text"],
            result["body"]["usage"]["completion_tokens"],
        )
    tokens = [e["token"] for e in choice["logprobs"]["content"]]
    return tokens, choice["message"]["content"], result["body"]["usage"]["completion_tokens"]


def test_burst_gets_fast_429s_and_admitted_requests_finish_exactly(
    small_queue, offline, tok, chat_ids, h, figures
):
    url = small_queue.url
    reqs = _burst(chat_ids, tok)
    h.wait_idle(url)

    start = time.monotonic()
    results = h.run(_fire(url, reqs, h), 240)
    seconds = time.monotonic() - start

    statuses = [res["status"] for res in results]
    assert set(statuses) <= {200, 429}, statuses
    admitted = [(r, res) for r, res in zip(reqs, results, strict=True) if res["status"] == 200]
    refused = [(r, res) for r, res in zip(reqs, results, strict=True) if res["status"] == 429]
    assert admitted and refused, statuses

    failures = []
    for r, res in admitted:
        exp = r["expected"] = offline(r["ids"], MAX_TOKENS, ignore_eos=True)  # alone
        try:
            tokens, text, count = _tokens_and_text(r["path"], res, h)
            assert tokens == [tok.decode([t]) for t in exp.token_ids]
            assert text == exp.text
            assert count == MAX_TOKENS == len(exp.token_ids)
        except AssertionError as exc:
            failures.append(f"{r['path']} stream={r['stream']} {r['body']}: {exc}")
    for r, res in refused:
        error = h.error_object(res["body"])
        assert error["type"] == "rate_limit_error", error
        if not r["stream"]:
            assert int(res["headers"]["retry-after"]) >= 1, res["headers"]

    slowest_429 = max(res["seconds"] for _, res in refused)
    fastest_200 = min(res["seconds"] for _, res in admitted)
    figures(
        requests=BURST,
        admitted=len(admitted),
        refused_429=len(refused),
        failures=len(failures),
        seconds=round(seconds, 1),
        median_429_s=round(statistics.median(res["seconds"] for _, res in refused), 3),
        slowest_429_s=round(slowest_429, 3),
        fastest_admitted_s=round(fastest_200, 3),
        median_admitted_s=round(statistics.median(res["seconds"] for _, res in admitted), 3),
        kv_blocks_after=h.kv_blocks_used(url),
    )
    assert not failures, "\n".join(failures[:10])
    # a refusal never waits for generation: the slowest 429 beats the fastest completion
    assert slowest_429 < fastest_200, (slowest_429, fastest_200)

    # the queue frees up: the next request is admitted and exact; nothing is left running
    h.wait_idle(url)
    first, _ = admitted[0]
    again = httpx.post(url + first["path"], json=first["body"], timeout=h.HTTP_TIMEOUT)
    assert again.status_code == 200, again.text
    assert _tokens_and_text(first["path"], {"status": 200, "body": again.json()}, h)[1] == (
        first["expected"].text
    )
    assert h.kv_blocks_used(url) == 0


def test_streamed_refusal_has_retry_after(small_queue, h):
    """A refused streamed request is a plain 429 response (not an SSE stream), with the
    header, so a client can back off before any event."""

    async def scenario() -> httpx.Response:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(
            base_url=small_queue.url, timeout=h.HTTP_TIMEOUT, limits=limits
        ) as client:
            long = {"prompt": "hold", "max_tokens": 400, "ignore_eos": True}
            holders: list[asyncio.Task] = []
            try:
                # two run (--max-num-seqs 2), then QUEUE wait: the queue is full
                for want, key in ((2, "running"), (QUEUE, "waiting")):
                    holders += [
                        asyncio.create_task(client.post("/v1/completions", json=long))
                        for _ in range(want)
                    ]
                    for _ in range(300):  # bounded
                        if (await asyncio.to_thread(h.gauges, small_queue.url))[key] >= want:
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError(f"never {want} {key}")
                body = {"prompt": "refused", "max_tokens": 2, "stream": True}
                return await client.post("/v1/completions", json=body)
            finally:
                for t in holders:
                    t.cancel()
                await asyncio.gather(*holders, return_exceptions=True)

    r = h.run(scenario(), 120)
    h.error_body(r, 429, "rate_limit_error")
    assert int(r.headers["retry-after"]) >= 1
    h.wait_idle(small_queue.url, timeout=30)


def test_request_that_can_never_be_admitted_is_not_told_to_retry(small_queue, h):
    """n choices beyond the whole queue can never wait in it, however long the client
    backs off: that is not 'too many requests, retry later' (429 + Retry-After, which a
    well-behaved client retries forever) but a request this server cannot take (400), or
    one it serves."""
    h.wait_idle(small_queue.url)
    body = {"prompt": "many choices", "max_tokens": 2, "n": QUEUE + 1, "temperature": 0}
    r = httpx.post(small_queue.url + "/v1/completions", json=body, timeout=h.HTTP_TIMEOUT)
    assert r.status_code != 429, (
        f"idle server, empty queue: n={QUEUE + 1} > --max-queued-requests {QUEUE} got "
        f"429 Retry-After {r.headers.get('retry-after')}: {r.text}"
    )
    assert r.status_code in (200, 400), r.text
