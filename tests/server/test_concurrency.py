"""64 streamed requests at once: each stream's deltas add up to the non-streamed result."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

N = 64
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _requests() -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of N varied greedy requests: completions and chat, short and long."""
    out = []
    for i in range(N):
        words = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + i % 11))
        body: dict[str, Any] = {
            "temperature": 0,
            "max_tokens": 1 + (i * 7) % 40,
            "ignore_eos": i % 3 == 0,
        }
        if i % 4 == 3:
            body["messages"] = [{"role": "user", "content": f"#{i} {words}"}]
            out.append(("/v1/chat/completions", body))
        else:
            body["prompt"] = f"Request {i}: {words}"
            out.append(("/v1/completions", body))
    return out


def _delta_text(path: str, choice: dict[str, Any]) -> str:
    if path == "/v1/completions":
        return choice["text"]
    return choice["delta"].get("content") or ""


def _whole_text(path: str, body: dict[str, Any]) -> str:
    choice = body["choices"][0]
    return choice["text"] if path == "/v1/completions" else choice["message"]["content"]


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any], parse_sse):
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", path, json=payload) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines()]
    return parse_sse(lines)


async def _run_all(base_url: str, parse_sse):
    reqs = _requests()
    limits = httpx.Limits(max_connections=2 * N, max_keepalive_connections=2 * N)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        streams = await asyncio.wait_for(
            asyncio.gather(*(_stream(client, p, b, parse_sse) for p, b in reqs)), 240
        )
        wholes = await asyncio.wait_for(
            asyncio.gather(*(client.post(p, json=b) for p, b in reqs)), 240
        )
    return reqs, streams, wholes


def test_64_concurrent_streams_equal_non_streamed(base_url, parse_sse, offline, wait_idle):
    reqs, streams, wholes = asyncio.run(_run_all(base_url, parse_sse))
    for i, ((path, body), events, whole) in enumerate(zip(reqs, streams, wholes, strict=True)):
        assert whole.status_code == 200, (i, whole.text)
        expected = whole.json()
        assert events and events[-1] == "[DONE]", (i, events[-3:])
        chunks = events[:-1]
        assert len({c["id"] for c in chunks}) == 1, i
        usage_chunks = [c for c in chunks if not c["choices"]]
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0], i
        streamed, whole_usage = dict(usage_chunks[0]["usage"]), dict(expected["usage"])
        cached_s = streamed.pop("prompt_tokens_details")["cached_tokens"]
        cached_w = whole_usage.pop("prompt_tokens_details")["cached_tokens"]
        assert streamed == whole_usage, i
        assert cached_s <= cached_w < whole_usage["prompt_tokens"], i  # the whole one ran second
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert all(c["index"] == 0 for c in choices), i
        text = "".join(_delta_text(path, c) for c in choices)
        assert text == _whole_text(path, expected), (i, body)
        finishes = [c["finish_reason"] for c in choices]
        assert finishes[-1] == expected["choices"][0]["finish_reason"], i
        assert all(f is None for f in finishes[:-1]), (i, finishes)
        if body.get("ignore_eos"):
            assert expected["usage"]["completion_tokens"] == body["max_tokens"], i
            assert finishes[-1] == "length"
    # and a few of them against the engine itself, offline in this process
    for i in (0, 1, 2, 5):
        path, body = reqs[i]
        assert path == "/v1/completions"
        params = {"ignore_eos": True} if body["ignore_eos"] else {}
        exp = offline(body["prompt"], body["max_tokens"], **params)
        assert _whole_text(path, wholes[i].json()) == exp.text, i
    wait_idle(base_url)
