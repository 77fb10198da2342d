"""Drain under load: SIGTERM while 16 streams are in flight, half of them still waiting for a
slot (--max-num-seqs 9: a long anchor stream and 8 of the 16 run, 8 wait). Readiness turns
503, every new request gets 503 with an error object (completions, chat, streamed, tokens,
models), all 16 streams still finish exactly (equal to their prompts run alone offline,
token for token), the anchor runs to its length, and the process exits 0.

tests/server/test_drain.py covers 8 running streams; this adds queued ones, chat, and
token-exactness. The server is this module's own and is ended by the test."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from typing import Any

import httpx
import pytest

N = 16
ANCHOR_TOKENS = 800  # keeps the drain open while the refusals are checked


@pytest.fixture(scope="module")
def drain_server(launch):
    server = launch("--shutdown-timeout", "120", "--max-num-seqs", str(N // 2 + 1))
    yield server
    server.stop()


def _streams(chat_ids, tok) -> list[dict[str, Any]]:
    rng = random.Random(16)
    out = []
    for i in range(N):
        max_tokens = rng.choice([8, 24, 48, 64])
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if i % 4 == 1:
            messages = [{"role": "user", "content": f"Drain chat {i} " + "x " * rng.randint(0, 20)}]
            body |= {"messages": messages, "logprobs": True, "top_logprobs": 0}
            out.append({"path": "/v1/chat/completions", "body": body, "ids": chat_ids(messages)})
        else:
            prompt = f"Drain {i}: " + "keep going " * rng.randint(0, 40)
            body |= {"prompt": prompt, "logprobs": 0}
            out.append({"path": "/v1/completions", "body": body, "ids": tok(prompt).input_ids})
    return out


async def _scenario(server, reqs: list[dict[str, Any]], h) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=2 * N + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=h.HTTP_TIMEOUT, limits=limits) as c:
        anchor_body = {"prompt": "anchor", "max_tokens": ANCHOR_TOKENS, "ignore_eos": True}
        anchor = asyncio.create_task(h.stream(c, "/v1/completions", anchor_body))
        for _ in range(600):  # bounded: the anchor runs before the 16 arrive
            if (await asyncio.to_thread(h.gauges, server.url))["running"] == 1:
                break
            await asyncio.sleep(0.05)
        tasks = [asyncio.create_task(h.stream(c, r["path"], r["body"])) for r in reqs]
        seen: dict[str, float] = {}
        for _ in range(600):  # bounded: all 16 admitted, 8 of them running and 8 waiting
            seen = await asyncio.to_thread(h.gauges, server.url)
            if seen["running"] + seen["waiting"] == N + 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"the 16 never were all in flight: {seen}")
        in_flight = dict(seen)

        server.proc.send_signal(signal.SIGTERM)
        for _ in range(200):  # bounded: readiness goes 503
            ready = await c.get("/ready")
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.05)
        h.error_body(ready, 503, "service_unavailable")
        refused = [
            await c.post("/v1/completions", json={"prompt": "late", "max_tokens": 2}),
            await c.post(
                "/v1/completions", json={"prompt": "late", "max_tokens": 2, "stream": True}
            ),
            await c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "late"}], "stream": True},
            ),
            await c.post("/tokenize", json={"prompt": "late"}),
            await c.post("/detokenize", json={"tokens": [0]}),
            await c.get("/v1/models"),
        ]
        health = (await c.get("/health")).status_code
        anchor_running = not anchor.done()
        results = await asyncio.gather(*tasks)
        finished_at = time.monotonic()
        anchor_result = await anchor
        return {
            "in_flight": in_flight,
            "refused": refused,
            "health": health,
            "anchor_running": anchor_running,
            "results": results,
            "anchor": anchor_result,
            "finished_at": finished_at,
        }


def test_sigterm_with_16_streams_running_and_queued(
    drain_server, offline, tok, chat_ids, h, figures
):
    reqs = _streams(chat_ids, tok)
    for r in reqs:
        r["expected"] = offline(r["ids"], r["body"]["max_tokens"], ignore_eos=True)

    start = time.monotonic()
    out = h.run(_scenario(drain_server, reqs, h), 300)
    try:
        code = drain_server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("no exit within 120 s of draining:\n" + drain_server.logs())
    seconds = time.monotonic() - start

    assert out["in_flight"]["waiting"] >= N // 2 - 1, out["in_flight"]  # some were queued
    for r in out["refused"]:
        h.error_body(r, 503, "service_unavailable")
    assert out["health"] == 200
    assert out["anchor_running"], "the drain closed before the refusals were checked"

    failures = []
    for i, (r, (status, events)) in enumerate(zip(reqs, out["results"], strict=True)):
        exp = r["expected"]
        try:
            assert status == 200, events
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            got = h.completion_tokens(r["path"], events[:-1])[0]
            assert got["tokens"] == [tok.decode([t]) for t in exp.token_ids]
            assert got["text"] == exp.text and got["finish_reason"] == "length"
            assert events[-2]["usage"]["completion_tokens"] == r["body"]["max_tokens"]
        except AssertionError as exc:
            failures.append(f"stream {i} ({r['path']}): {exc}")
    status, events = out["anchor"]
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == ANCHOR_TOKENS

    figures(
        requests=N + 1,
        queued_at_sigterm=int(out["in_flight"]["waiting"]),
        refused_503=len(out["refused"]),
        failures=len(failures),
        seconds=round(seconds, 1),
        exit_code=code,
    )
    assert not failures, "\n".join(failures)
    assert code == 0, drain_server.logs()
