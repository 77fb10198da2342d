"""Disconnect storm: 50 clients hang up mid-stream at seeded random points while 20 others
run. The 20 finish exactly (equal to their prompts run alone offline); every abandoned
request is counted as an abort; the running/waiting gauges and KV usage return to 0."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx

N_DROP = 50
N_KEEP = 20
DROP_MAX_TOKENS = 1000  # far more than any client reads before it leaves


def _plan(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    drops = []
    for i in range(N_DROP):
        body: dict[str, Any] = {"max_tokens": DROP_MAX_TOKENS, "ignore_eos": True}
        if i % 5 == 4:  # chat, two choices: both must be aborted
            path = "/v1/chat/completions"
            body |= {"messages": [{"role": "user", "content": f"drop {i}"}], "n": 2}
        else:
            path = "/v1/completions"
            body["prompt"] = f"Client {i} will leave " + "soon " * rng.randint(0, 60)
        drops.append(
            {
                "path": path,
                "body": body,
                "delay": rng.uniform(0.0, 1.5),  # when it starts
                # how many data events it reads before it leaves; 0: leaves once the
                # headers are in; -1: leaves right after sending, before any answer
                "events": -1 if i % 10 == 0 else rng.randint(0, 40),
            }
        )
    keeps = []
    for i in range(N_KEEP):
        prompt = f"Client {i} stays until the end: " + "word " * rng.randint(0, 80)
        body = {"prompt": prompt, "max_tokens": rng.choice([8, 24, 48, 96]), "temperature": 0}
        if i % 2:
            body["ignore_eos"] = True
        body["logprobs"] = 0
        keeps.append({"path": "/v1/completions", "body": body, "delay": rng.uniform(0, 1.0)})
    return drops, keeps


async def _drop(url: str, plan: dict[str, Any]) -> int:
    """Stream on a connection of its own, read plan['events'] data events, hang up."""
    await asyncio.sleep(plan["delay"])
    if plan["events"] < 0:  # raw HTTP: send the request, close without reading a byte
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({**plan["body"], "stream": True}).encode()
        head = (
            f"POST {plan['path']} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        return -1
    seen = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0, connect=15.0)) as client,
        client.stream("POST", plan["path"], json={**plan["body"], "stream": True}) as r,
    ):
        assert r.status_code == 200, await r.aread()
        if plan["events"] == 0:
            return 0  # leaves as soon as the headers are in
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the stream ended before the client left"
                assert "error" not in json.loads(line.removeprefix("data: ")), line
                seen += 1
                if seen >= plan["events"]:
                    break
    return seen  # leaving the blocks closes the response and the socket


async def _keep(client: httpx.AsyncClient, plan: dict[str, Any], h) -> tuple[int, list[Any]]:
    await asyncio.sleep(plan["delay"])
    return await h.stream(client, plan["path"], plan["body"])


async def _storm(url: str, drops, keeps, h):
    limits = httpx.Limits(max_connections=N_KEEP + 8)
    async with httpx.AsyncClient(base_url=url, timeout=h.HTTP_TIMEOUT, limits=limits) as client:
        return await asyncio.gather(
            asyncio.gather(*(_drop(url, d) for d in drops)),
            asyncio.gather(*(_keep(client, k, h) for k in keeps)),
        )


def test_disconnect_storm_leaves_others_exact_and_frees_everything(
    shared_server, offline, tok, h, figures
):
    url = shared_server.url
    drops, keeps = _plan(random.Random(50))
    for k in keeps:
        params = {"ignore_eos": True} if k["body"].get("ignore_eos") else {}
        k["expected"] = offline(k["body"]["prompt"], k["body"]["max_tokens"], **params)
    h.wait_idle(url)
    before = h.gauges(url)

    start = time.monotonic()
    dropped, kept = h.run(_storm(url, drops, keeps, h), 240)
    seconds = time.monotonic() - start

    failures = []
    for i, (k, (status, events)) in enumerate(zip(keeps, kept, strict=True)):
        exp = k["expected"]
        try:
            assert status == 200, events
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            got = h.completion_tokens(k["path"], events[:-1])[0]
            assert got["tokens"] == [tok.decode([t]) for t in exp.token_ids]
            assert got["text"] == exp.text and got["finish_reason"] == exp.finish_reason
            assert events[-2]["usage"]["completion_tokens"] == len(exp.token_ids)
        except AssertionError as exc:
            failures.append(f"kept request {i}: {exc}")
    assert dropped == [d["events"] for d in drops]  # each left where it was meant to

    # every abandoned choice is aborted (n=2 chats count twice), and the engine lets go
    aborted = sum(d["body"].get("n", 1) for d in drops)
    seen: dict[str, float] = {}

    def all_aborted() -> bool:
        seen.update(h.gauges(url))
        return seen["abort"] - before["abort"] >= aborted

    h.wait_for(all_aborted, 30, interval=0.2, what=f"{aborted} aborts (now {seen})")
    idle = h.wait_idle(url, timeout=30)
    blocks = h.kv_blocks_used(url)
    figures(
        requests=N_DROP + N_KEEP,
        dropped=N_DROP,
        dropped_choices=aborted,
        failures=len(failures),
        seconds=round(seconds, 1),
        aborts_counted=int(idle["abort"] - before["abort"]),
        kv_blocks_after=blocks,
    )
    assert not failures, "\n".join(failures[:10])
    assert idle["abort"] - before["abort"] == aborted, (before, idle)
    assert idle["length"] + idle["stop"] - before["length"] - before["stop"] == N_KEEP
    assert blocks == 0
