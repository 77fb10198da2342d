"""usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served, in
whole responses, streamed usage chunks and chat, counted once per prompt like prompt_tokens;
always present, 0 for a prompt seen first and on a server with prefix caching off.

Every test sends prompts no other test sends (the shared server's cache outlives a test)."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
P = "packserve:"


def _ids(seed: str, n: int = 300) -> list[int]:
    """A prompt of n token ids of its own."""
    rng = random.Random(seed)
    return [rng.randrange(16, 8000) for _ in range(n)]


def _words(seed: str, n: int = 120) -> str:
    """Chat text of its own, a few hundred tokens once templated."""
    rng = random.Random(seed)
    vocabulary = ["river", "stone", "lamp", "orbit", "cedar", "piano", "salt", "mirror", "quartz"]
    return f"{seed}: " + " ".join(rng.choice(vocabulary) for _ in range(n))


@pytest.fixture(scope="module")
def block_size(http) -> int:
    """The server's KV block size, as its dashboard feed states its config."""
    config = http.get("/dashboard/feed").json()["config"]
    assert config["prefix_caching"] is True
    return config["block_size"]


def _cached(usage: dict[str, Any]) -> int:
    details = usage["prompt_tokens_details"]
    assert set(details) == {"cached_tokens"}, usage
    cached = details["cached_tokens"]
    assert isinstance(cached, int) and 0 <= cached <= usage["prompt_tokens"], usage
    return cached


def assert_hit(usage: dict[str, Any], block_size: int) -> int:
    """A repeated prompt whose blocks are all still cached: every full block is served from
    the cache but the one holding its last token (which must run to give the first token)."""
    cached, prompt = _cached(usage), usage["prompt_tokens"]
    assert cached > 0 and cached % block_size == 0, (usage, block_size)
    assert 0 < prompt - cached <= block_size, (usage, block_size)
    return cached


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _stream_usage(http: httpx.Client, path: str, body: dict[str, Any], parse_sse) -> dict:
    """The usage of a streamed request: its one usage chunk, the last before [DONE]."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        events = parse_sse(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c for c in chunks if c.get("usage")] == [chunks[-1]], chunks[-3:]
    assert chunks[-1]["choices"] == []
    return chunks[-1]["usage"]


def test_completion_repeat_reports_cached_tokens(http, block_size):
    body = {"prompt": _ids("cmpl-whole"), "max_tokens": 4, "temperature": 0}
    first = _post(http, CMPL, body)["usage"]
    assert first["prompt_tokens"] == 300
    assert _cached(first) == 0  # present, and 0: nothing of it was cached
    second = _post(http, CMPL, body)["usage"]
    assert second["prompt_tokens"] == 300
    assert_hit(second, block_size)


def test_streamed_usage_reports_cached_tokens(http, parse_sse, block_size):
    body = {"prompt": _ids("cmpl-stream"), "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    assert _cached(_stream_usage(http, CMPL, body, parse_sse)) == 0
    repeat = _stream_usage(http, CMPL, body, parse_sse)
    assert_hit(repeat, block_size)
    assert _post(http, CMPL, body)["usage"] == repeat  # a third run, whole: the same usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_repeat_reports_cached_tokens(http, parse_sse, block_size, stream):
    messages = [
        {"role": "system", "content": _words(f"chat-system-{stream}")},
        {"role": "user", "content": _words(f"chat-user-{stream}", 40)},
    ]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0}

    def usage() -> dict[str, Any]:
        if stream:
            return _stream_usage(http, CHAT, body, parse_sse)
        return _post(http, CHAT, body)["usage"]

    first = usage()
    assert first["prompt_tokens"] > 4 * block_size
    assert _cached(first) == 0
    assert_hit(usage(), block_size)
    # a next turn resends the history: its prefix (the system message and more) is cached
    turn = {**body, "messages": [*messages, {"role": "assistant", "content": "ok"}]}
    turn["messages"].append({"role": "user", "content": "and then?"})
    later = _post(http, CHAT, turn)["usage"]
    assert later["prompt_tokens"] > first["prompt_tokens"]
    assert block_size <= _cached(later) <= first["prompt_tokens"]
    assert _cached(later) % block_size == 0


def test_cached_tokens_count_each_prompt_once(http, block_size):
    """n choices share their prompt: its cached tokens count once, as its tokens do."""
    long, short = _ids("n-long"), _ids("n-short", 20)
    assert _cached(_post(http, CMPL, {"prompt": long, "max_tokens": 1})["usage"]) == 0
    body = {"prompt": [long, short], "n": 2, "max_tokens": 2, "temperature": 0.7, "seed": 3}
    usage = _post(http, CMPL, body)["usage"]
    assert usage["prompt_tokens"] == len(long) + len(short)
    cached = _cached(usage)
    assert cached % block_size == 0
    # `long` was cached before: all its full blocks but the last token's, counted once;
    # `short` is new, but its second choice may find what its first computed.
    long_hit = (len(long) - 1) // block_size * block_size
    assert long_hit <= cached <= long_hit + (len(short) - 1) // block_size * block_size


def test_dashboard_shows_the_hit_rate(http, block_size, wait_for):
    body = {"prompt": _ids("dashboard-rate"), "max_tokens": 1}
    _post(http, CMPL, body)
    assert_hit(_post(http, CMPL, body)["usage"], block_size)

    def rate() -> float | None:
        summary = http.get("/dashboard/feed").json()["summary"]
        hits, queries = summary["prefix_cache_hits"], summary["prefix_cache_queries"]
        assert 0 <= hits <= queries
        return summary["prefix_cache_hit_rate"] if hits else None

    # the rates cover complete seconds: the repeat shows within the next one or two
    assert 0 < wait_for(rate, 5.0, what="a prefix-cache hit on the dashboard") <= 1


def test_no_prefix_caching_reports_zero(launch_server, parse_sse, metrics, metric, settle):
    server = launch_server("--no-enable-prefix-caching")
    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as http:
            assert http.get("/dashboard/feed").json()["config"]["prefix_caching"] is False
            before = metrics(server.url)
            body = {"prompt": _ids("no-cache"), "max_tokens": 2, "temperature": 0}
            for _ in range(2):
                usage = _post(http, CMPL, body)["usage"]
                assert usage["prompt_tokens"] == 300 and _cached(usage) == 0
            assert _cached(_stream_usage(http, CMPL, body, parse_sse)) == 0
            chat = {"messages": [{"role": "user", "content": _words("no-cache")}], "max_tokens": 1}
            for _ in range(2):
                assert _cached(_post(http, CHAT, chat)["usage"]) == 0
            settle(server.url)
            after = metrics(server.url)

        def d(name: str) -> float:
            return metric(after, P + name) - metric(before, P + name)

        assert d("prefix_cache_hits_total") == 0
        assert d("prompt_tokens_total") >= 3 * 300  # every prompt token counted
    finally:
        server.stop()
