"""Load: 128 streamed greedy requests at once, mixed prompt and output lengths, completions
and chat, text and token-id prompts. Each answer equals that prompt run alone through the
offline engine, token for token (the token strings of `logprobs`, the text and the usage
count), and afterwards no KV block is in use."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx

N = 128
WORDS = ["river", "stone", "light", "window", "paper", "garden", "music", "silver"]


def _workload(vocab: int, chat_ids) -> list[dict[str, Any]]:
    """(path, body, prompt ids) of N seeded greedy requests."""
    rng = random.Random(128)
    out = []
    for i in range(N):
        max_tokens = rng.choice([1, 2, 5, 9, 16, 24, 40, 64])
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}
        if rng.random() < 0.5:
            body["ignore_eos"] = True
        if i % 4 == 3:
            content = f"#{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 80)))
            messages = [{"role": "user", "content": content}]
            body |= {"messages": messages, "logprobs": True, "top_logprobs": 0}
            out.append({"path": "/v1/chat/completions", "body": body, "ids": chat_ids(messages)})
            continue
        if i % 2 == 0:  # token ids, 1..400 of them
            prompt: Any = [rng.randrange(6, vocab) for _ in range(rng.choice([1, 3, 40, 400]))]
            prompt = prompt[: rng.randint(1, len(prompt))]
        else:
            prompt = f"Load {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(0, 120)))
        body |= {"prompt": prompt, "logprobs": 0}
        out.append({"path": "/v1/completions", "body": body, "ids": prompt})
    return out


async def _fire(url: str, reqs: list[dict[str, Any]], h) -> list[tuple[int, list[Any], float]]:
    limits = httpx.Limits(max_connections=N + 8, max_keepalive_connections=N + 8)
    async with httpx.AsyncClient(base_url=url, timeout=h.HTTP_TIMEOUT, limits=limits) as client:

        async def one(r: dict[str, Any]) -> tuple[int, list[Any], float]:
            start = time.monotonic()
            status, events = await h.stream(client, r["path"], r["body"])
            return status, events, time.monotonic() - start

        return await asyncio.gather(*(one(r) for r in reqs))


def test_128_concurrent_streams_equal_each_prompt_alone(
    shared_server, offline, offline_engine, tok, chat_ids, h, figures
):
    reqs = _workload(offline_engine.model.config.vocab_size, chat_ids)
    for r in reqs:  # expected outputs first, each prompt alone, before the server is busy
        params = {"ignore_eos": True} if r["body"].get("ignore_eos") else {}
        r["ids"] = r["ids"] if not isinstance(r["ids"], str) else tok(r["ids"]).input_ids
        r["expected"] = offline(r["ids"], r["body"]["max_tokens"], **params)
    h.wait_idle(shared_server.url)

    start = time.monotonic()
    results = h.run(_fire(shared_server.url, reqs, h), 300)
    seconds = time.monotonic() - start

    failures = []
    generated = 0
    for i, (r, (status, events, _)) in enumerate(zip(reqs, results, strict=True)):
        exp = r["expected"]
        want_tokens = [tok.decode([t]) for t in exp.token_ids]
        try:
            assert status == 200, events
            assert events[-1] == "[DONE]", events[-3:]
            chunks = events[:-1]
            assert not any("error" in c for c in chunks), chunks
            assert len({c["id"] for c in chunks}) == 1
            usage = chunks[-1]
            assert usage["choices"] == [] and all(c["choices"] for c in chunks[:-1])
            got = h.completion_tokens(r["path"], chunks)
            assert set(got) == {0}
            assert got[0]["tokens"] == want_tokens, "token strings differ"
            assert got[0]["text"] == exp.text
            assert got[0]["finish_reason"] == exp.finish_reason
            assert usage["usage"]["completion_tokens"] == len(exp.token_ids), "token count"
            assert usage["usage"]["prompt_tokens"] == len(r["ids"])
            generated += usage["usage"]["completion_tokens"]
        except AssertionError as exc:
            failures.append(f"request {i} ({r['path']}, {r['body']}): {exc}")

    idle = h.wait_idle(shared_server.url)
    blocks = h.kv_blocks_used(shared_server.url)
    latencies = sorted(t for _, _, t in results)
    figures(
        requests=N,
        failures=len(failures),
        seconds=round(seconds, 1),
        tokens=generated,
        p50_latency_s=round(latencies[N // 2], 2),
        kv_blocks_after=blocks,
    )
    assert not failures, f"{len(failures)} of {N} differ:\n" + "\n".join(failures[:10])
    assert idle["kv"] == 0 and blocks == 0
