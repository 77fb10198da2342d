"""Engine fault isolation, through the test-only hook of fault_server.py (packserve with a
model whose forwards raise on token T, given in PACKSERVE_TEST_FAULT_TOKEN_ID): any engine
step that would run token T raises, and exactly the requests in that step fail
(a streamed one with an error event then [DONE], a non-streamed one with a 500 error
object). Requests in other steps are untouched; afterwards the server is ready, exact, and
holds no KV block.

One step runs every running sequence's next token plus the newly admitted prompts, so the
requests that share a faulty prompt's step are exactly those running when it is admitted."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.allow_server_500  # the 500s are the point here

FAULT_SERVER = (sys.executable, str(Path(__file__).with_name("fault_server.py")), "serve")
FAULT_ENV = "PACKSERVE_TEST_FAULT_TOKEN_ID"  # read by fault_server.py
DECODE_FAULT_AT = 15  # the fault token is the 16th a prompt generates
RUNNING_PROMPTS = [f"Running request {i} shares the step with the faulty prompt" for i in range(6)]
EXACT_PROMPTS = [f"After the fault, request {i} is fine" for i in range(3)]


@dataclass(frozen=True)
class FaultCase:
    """The fault token and prompts around it, derived from the model at hand (no token id
    is pinned: the model's tokenizer and outputs are whatever this machine builds)."""

    token: int  # the token whose step fails
    decode_prompt: list[int]  # greedy: generates `token` as its 16th token, not before
    prompt: list[int]  # a token-id prompt holding `token`
    chat_content: str  # chat text whose prompt holds `token`


@pytest.fixture(scope="module")
def case(offline, tok, chat_ids) -> FaultCase:
    """The first of some seeded token-id prompts whose 16th greedy token is new to it and
    to every other prompt these tests run, so only the chosen requests ever meet it."""
    others = [offline(p, 12) for p in EXACT_PROMPTS]
    others += [offline(p, 300, ignore_eos=True) for p in RUNNING_PROMPTS]
    seen = {t for c in others for t in (*c.prompt_token_ids, *c.token_ids)}
    rng = random.Random(15)
    vocab = len(tok)
    for _ in range(50):
        decode_prompt = [rng.randrange(16, vocab) for _ in range(17)]
        exp = offline(decode_prompt, DECODE_FAULT_AT + 1, ignore_eos=True)
        token = exp.token_ids[DECODE_FAULT_AT]
        if token in seen or token in decode_prompt or token in exp.token_ids[:-1]:
            continue
        content = f"the{tok.decode([token])} of it"
        if token in chat_ids([{"role": "user", "content": content}]):
            return FaultCase(token, decode_prompt, [0, 2513, 321, token, 265], content)
    raise AssertionError("no seeded prompt gives a usable fault token")


@pytest.fixture(scope="module")
def faulty(launch, case):
    server = launch(command=FAULT_SERVER, env={FAULT_ENV: str(case.token)})
    yield server
    server.stop()


def _assert_error_event_then_done(events: list[Any], h, after: int | None = 0) -> dict[str, Any]:
    """`events` end with one error event (an OpenAI error object) and [DONE], after `after`
    ordinary chunks (None: any number). Returns the inner error."""
    assert events[-1] == "[DONE]", events[-3:]
    errors = [i for i, e in enumerate(events[:-1]) if "error" in e]
    assert errors == [len(events) - 2], events
    if after is not None:
        assert len(events) - 2 == after, (len(events) - 2, after, events)
    error = h.error_object(events[-2])
    assert error["type"] == "server_error", error
    assert "injected fault" in error["message"], error
    return error


def _exact(url: str, offline, tok, h, n: int = 3) -> None:
    """A few ordinary greedy requests, each equal to its prompt alone offline."""
    for prompt in EXACT_PROMPTS[:n]:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=h.HTTP_TIMEOUT)
        assert r.status_code == 200, r.text
        exp = offline(prompt, 12)
        choice = r.json()["choices"][0]
        assert choice["text"] == exp.text
        assert choice["logprobs"]["tokens"] == [tok.decode([t]) for t in exp.token_ids]


def _assert_recovered(url: str, offline, tok, h) -> int:
    assert httpx.get(url + "/ready", timeout=h.HTTP_TIMEOUT).status_code == 200
    _exact(url, offline, tok, h)
    h.wait_idle(url)
    blocks = h.kv_blocks_used(url)
    assert blocks == 0
    return blocks


def test_prompt_with_the_fault_token_fails_with_an_error_body(
    faulty, case, offline, tok, h, figures
):
    url = faulty.url
    prompt = case.prompt
    before = h.gauges(url)
    # non-streamed: a 500 with an OpenAI error object
    r = httpx.post(
        url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8}, timeout=h.HTTP_TIMEOUT
    )
    error = h.error_body(r, 500, "server_error")
    assert "injected fault" in error["message"], error

    async def streams() -> list[tuple[int, list[Any]]]:
        async with httpx.AsyncClient(base_url=url, timeout=h.HTTP_TIMEOUT) as client:
            return [
                await h.stream(
                    client, "/v1/completions", {"prompt": prompt, "max_tokens": 8}, False
                ),
                # chat: the content holds the fault token; the role chunk comes first
                await h.stream(
                    client,
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": case.chat_content}], "max_tokens": 8},
                    False,
                ),
                # with usage requested: the usage chunk still comes, after the error
                await h.stream(client, "/v1/completions", {"prompt": prompt, "max_tokens": 8}),
            ]

    (s1, plain), (s2, chat), (s3, with_usage) = h.run(streams(), 120)
    assert s1 == s2 == s3 == 200
    _assert_error_event_then_done(plain, h)
    assert chat[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    _assert_error_event_then_done([e for e in chat[1:]], h)
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 0
    _assert_error_event_then_done(with_usage[:-2] + ["[DONE]"], h)

    blocks = _assert_recovered(url, offline, tok, h)
    after = h.gauges(url)
    assert after["error"] - before["error"] == 4, (before, after)
    figures(
        requests=4 + 3,
        failures_expected=4,
        errors_counted=int(after["error"] - before["error"]),
        kv_blocks_after=blocks,
    )


def test_generated_fault_token_fails_the_step_that_would_run_it(faulty, case, offline, tok, h):
    """Decode path: the request streams its tokens up to and including the fault token
    (sampled in a healthy step); the next step would run it and fails. With max_tokens ending
    on that token the request finishes normally: the fault token is never run."""
    url = faulty.url
    exp = offline(case.decode_prompt, DECODE_FAULT_AT + 1, ignore_eos=True)

    body = {"prompt": case.decode_prompt, "max_tokens": DECODE_FAULT_AT + 1, "logprobs": 0}
    body |= {"temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=h.HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == exp.text and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"][-1] == tok.decode([case.token])

    longer = {**body, "max_tokens": 40}
    r = httpx.post(url + "/v1/completions", json=longer, timeout=h.HTTP_TIMEOUT)
    h.error_body(r, 500, "server_error")

    async def stream() -> tuple[int, list[Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=h.HTTP_TIMEOUT) as client:
            return await h.stream(client, "/v1/completions", longer, usage=False)

    status, events = h.run(stream(), 120)
    assert status == 200
    got = h.completion_tokens("/v1/completions", events)[0]
    assert got["tokens"] == [tok.decode([t]) for t in exp.token_ids]  # all 16, then the fault
    assert got["text"] == exp.text and got["finish_reason"] is None
    _assert_error_event_then_done(events, h, after=None)
    _assert_recovered(url, offline, tok, h)


async def _fault_scenario(url: str, h, running: list[dict], fault_body: dict):
    """Start `running` (streamed ones and non-streamed ones), wait until every one of them is
    in the decode batch, then send the faulty prompt; then, after it failed, more requests."""
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=h.HTTP_TIMEOUT, limits=limits) as client:
        first = [asyncio.Event() for _ in running]

        async def streamed(body: dict, seen: asyncio.Event) -> tuple[int, list[Any]]:
            payload = {**body, "stream": True}
            async with client.stream("POST", "/v1/completions", json=payload) as r:
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: "):
                        seen.set()
            return r.status_code, h.parse_sse(lines)

        async def plain(body: dict, seen: asyncio.Event) -> tuple[int, Any]:
            seen.set()  # can't see its tokens; the running gauge below covers it
            r = await client.post("/v1/completions", json=body)
            return r.status_code, r.json()

        tasks = [
            asyncio.create_task((streamed if r["stream"] else plain)(r["body"], e))
            for r, e in zip(running, first, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in first))
        for _ in range(600):  # bounded: all of them running
            if (await asyncio.to_thread(h.gauges, url))["running"] == len(running):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the requests never all ran")
        assert not any(t.done() for t in tasks)
        fault = await h.stream(client, "/v1/completions", fault_body, usage=False)
        results = await asyncio.gather(*tasks)
        return fault, results


def test_requests_sharing_the_faulty_step_fail_others_succeed(
    faulty, case, offline, tok, h, figures
):
    url = faulty.url
    h.wait_idle(url)
    before = h.gauges(url)
    # other steps, before: exact
    _exact(url, offline, tok, h, n=2)

    running = []
    for i, prompt in enumerate(RUNNING_PROMPTS):
        body = {"prompt": prompt, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
        body["logprobs"] = 0
        running.append({"body": body, "stream": i % 3 != 2})
    fault_body = {"prompt": case.prompt, "max_tokens": 8}

    start = time.monotonic()
    (fault_status, fault_events), results = h.run(_fault_scenario(url, h, running, fault_body), 180)
    seconds = time.monotonic() - start
    assert fault_status == 200
    _assert_error_event_then_done(fault_events, h)

    for r, (status, out) in zip(running, results, strict=True):
        prompt = r["body"]["prompt"]
        if not r["stream"]:
            assert status == 500, out
            error = h.error_object(out)
            assert error["type"] == "server_error" and "injected fault" in error["message"]
            continue
        assert status == 200
        got = h.completion_tokens("/v1/completions", out)[0]
        n = len(got["tokens"])
        assert 1 <= n < 300 and got["finish_reason"] is None
        _assert_error_event_then_done(out, h, after=None)
        # up to the fault, each was exact, and never ran the fault token itself
        exp = offline(prompt, n, ignore_eos=True)
        assert case.token not in exp.token_ids
        assert got["tokens"] == [tok.decode([t]) for t in exp.token_ids]
        assert exp.text.startswith(got["text"])

    # other steps, after: exact, and a long one too, while nothing faulty runs
    blocks = _assert_recovered(url, offline, tok, h)
    long = running[0]["body"] | {"max_tokens": 64}
    r = httpx.post(url + "/v1/completions", json=long, timeout=h.HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline(long["prompt"], 64, ignore_eos=True).text
    after = h.gauges(url)
    failed = len(running) + 1
    figures(
        requests=len(running) + 1 + 2 + 3 + 1,
        failed_in_fault_step=failed,
        errors_counted=int(after["error"] - before["error"]),
        seconds=round(seconds, 1),
        kv_blocks_after=blocks,
    )
    assert after["error"] - before["error"] == failed, (before, after)
    assert h.kv_blocks_used(url) == 0
