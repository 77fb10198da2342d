"""Hand-written nasty inputs: each gets a 4xx with an OpenAI error object, or a 200 where
that is the right answer (checked against the offline engine), never a 5xx and never a hang
(every request has a bounded timeout). Meanwhile a canary client streams ordinary requests
without pause; every one of them must come back exact, so the server kept serving.

The ordinary invalid parameters are in tests/server/test_errors.py; these are the extremes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
TIMEOUT = httpx.Timeout(60.0, connect=15.0)  # "never a hang": every request is bounded
EURO = [164, 230, 111]  # the three byte tokens of "€" (0xE2 0x82 0xAC)
SPECIAL_TEXT = "<|bos|><|eos|><|pad|><|system|><|user|><|assistant|>"


class Canary:
    """A thread that streams ordinary greedy requests one after another until stopped and
    checks each against the offline engine."""

    def __init__(self, url: str, expected: dict[str, str], h) -> None:
        self.url, self.expected, self.h = url, expected, h
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="canary", daemon=True)

    def _run(self) -> None:
        prompts = list(self.expected)
        with httpx.Client(base_url=self.url, timeout=TIMEOUT) as client:
            i = 0
            while not self.stop.is_set() and i < 10_000:
                prompt = prompts[i % len(prompts)]
                body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
                try:
                    with client.stream("POST", CMPL, json={**body, "ignore_eos": True}) as r:
                        lines = list(r.iter_lines())
                    events = self.h.parse_sse(lines)
                    text = "".join(e["choices"][0]["text"] for e in events[:-1])
                    if r.status_code != 200 or events[-1] != "[DONE]":
                        self.errors.append(f"{r.status_code}: {lines[-3:]}")
                    elif text != self.expected[prompt]:
                        self.errors.append(f"{prompt!r}: {text!r} != {self.expected[prompt]!r}")
                except (httpx.HTTPError, AssertionError, ValueError, KeyError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.done += 1
                i += 1


@pytest.fixture(scope="module")
def canary(shared_server, offline, h) -> Iterator[Canary]:
    prompts = [f"Canary {i} keeps streaming through the storm" for i in range(4)]
    expected = {p: offline(p, 24, ignore_eos=True).text for p in prompts}
    c = Canary(shared_server.url, expected, h)
    c.thread.start()
    yield c
    c.stop.set()
    c.thread.join(timeout=120)


@pytest.fixture
def http(shared_server, canary) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_server.url, timeout=TIMEOUT) as client:
        yield client


def _raw(client: httpx.Client, path: str, raw: bytes, ctype: str = "application/json"):
    return client.post(path, content=raw, headers={"content-type": ctype})


def _is_4xx_error_or_200(r: httpx.Response, h) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert 400 <= r.status_code < 500, r.status_code
        h.error_body(r, r.status_code)


# -- empty and special prompts: valid, and the answer is the engine's ----------------------------


def test_empty_text_prompt_is_just_bos(http, offline, tok, h):
    """ "" tokenizes to [BOS]: a valid one-token prompt, answered like the engine does."""
    assert tok("").input_ids == [0]
    for prompt in ("", [""]):
        r = http.post(CMPL, json={"prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline("", 6).text
        assert r.json()["usage"]["prompt_tokens"] == 1


def test_empty_token_prompts_and_empty_messages_are_400(http, h):
    h.error_body(http.post(CMPL, json={"prompt": [], "max_tokens": 2}), 400)
    h.error_body(http.post(CMPL, json={"prompt": [[1, 2], []], "max_tokens": 2}), 400)
    h.error_body(http.post(CHAT, json={"messages": [], "max_tokens": 2}), 400)
    h.error_body(http.post("/detokenize", json={}), 400)


def test_empty_chat_content_is_served(http, offline, chat_ids):
    messages = [{"role": "user", "content": ""}]
    r = http.post(CHAT, json={"messages": messages, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    exp = offline(chat_ids(messages), 6)
    assert r.json()["choices"][0]["message"]["content"] == exp.text


@pytest.mark.parametrize(
    "prompt",
    [SPECIAL_TEXT, [0, 1, 2, 3, 4, 5], [1], [2] * 50, [[5, 5, 5], [0]]],
    ids=["special-text", "special-ids", "eos-only", "pad-x50", "two-special-prompts"],
)
def test_prompt_of_only_special_tokens_is_served(http, offline, tok, prompt, h):
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1}
    r = http.post(CMPL, json=body)
    assert r.status_code == 200, r.text
    prompts = prompt if isinstance(prompt, list) and isinstance(prompt[0], list) else [prompt]
    for choice, p in zip(r.json()["choices"], prompts, strict=True):
        exp = offline(p, 6)
        ids = tok(p).input_ids if isinstance(p, str) else p
        echo = tok.decode(ids, skip_special_tokens=True)
        assert choice["text"] == echo + exp.text
        assert choice["logprobs"]["tokens"] == [tok.decode([t]) for t in exp.token_ids]


# -- bytes that are not characters ----------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [EURO[:1], EURO[:2], EURO[1:], EURO[::-1], EURO, [EURO[0], 0, EURO[1], 1, EURO[2]]],
    ids=["lead-byte", "two-of-three", "continuation-only", "reversed", "whole", "split-by-special"],
)
def test_detokenize_partial_utf8_is_replacement_characters(http, tok, ids):
    r = http.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    text = json.loads(r.content.decode("utf-8", errors="strict"))["prompt"]
    assert text == tok.decode(ids)
    if ids != EURO:
        assert "\ufffd" in text


def test_partial_utf8_prompt_and_echo_are_served(http, offline, tok):
    body = {"prompt": EURO[:2], "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 0}
    for stream in (False, True):
        r = http.post(CMPL, json={**body, "stream": stream})
        assert r.status_code == 200, r.text
        r.content.decode("utf-8", errors="strict")  # valid UTF-8 on the wire
    r = http.post(CMPL, json=body)
    assert r.json()["choices"][0]["text"] == tok.decode(EURO[:2]) + offline(EURO[:2], 6).text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CMPL, {"prompt": "\ud800", "max_tokens": 2}),
        (CMPL, {"prompt": ["ok", "lone \udfff surrogate"], "max_tokens": 2}),
        (CHAT, {"messages": [{"role": "user", "content": "\ud83d"}], "max_tokens": 2}),
        ("/tokenize", {"prompt": "\ud800"}),
    ],
    ids=["completion", "completion-list", "chat", "tokenize"],
)
def test_lone_surrogate_in_text_is_a_400(http, h, path, body):
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); Python's parser accepts it, but it
    is no character and no tokenizer can encode it: the request is invalid (400), not a
    server failure."""
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as \\ud800
    h.error_body(_raw(http, path, raw), 400, "invalid_request_error")


# -- numbers out of every range -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "x", "max_tokens": 2, "temperature": NaN}',
        b'{"prompt": "x", "max_tokens": 2, "temperature": -1}',
        b'{"prompt": "x", "max_tokens": 2, "temperature": -0.0001}',
        b'{"prompt": "x", "max_tokens": 2, "temperature": Infinity}',
        b'{"prompt": "x", "max_tokens": 2, "temperature": -Infinity}',
        b'{"prompt": "x", "max_tokens": 2, "top_p": NaN}',
        b'{"prompt": "x", "max_tokens": 2, "presence_penalty": NaN}',
        b'{"prompt": "x", "max_tokens": 2, "frequency_penalty": -Infinity}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "temperature": NaN}',
        b'{"prompt": "x", "max_tokens": 2, "n": 1000000}',
        b'{"prompt": "x", "max_tokens": 2, "n": 18446744073709551617}',
        b'{"prompt": "x", "max_tokens": 2, "n": 1e308}',
        b'{"prompt": "x", "max_tokens": 2, "n": -1}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 100000}',
        b'{"prompt": "x", "max_tokens": 2, "seed": 99999999999999999999999999}',
        b'{"prompt": "x", "max_tokens": 2, "logprobs": 100000}',
        b'{"prompt": "x", "max_tokens": 1e400}',
        b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"prompt": [0, 99999999999999999999999999999], "max_tokens": 2}',
        b'{"tokens": [18446744073709551616]}',
    ],
    ids=lambda raw: raw.decode()[:60],
)
def test_out_of_range_numbers_are_400(http, h, raw):
    path = "/detokenize" if raw.startswith(b'{"tokens"') else CMPL
    path = CHAT if b"messages" in raw else path
    h.error_body(_raw(http, path, raw), 400, "invalid_request_error")


def test_huge_max_tokens_is_a_context_overflow_and_huge_top_k_is_capped(http, h, offline):
    """Numbers too large to mean anything but valid by type: a max_tokens past the context is
    OpenAI's context-overflow 400; a top_k past the vocabulary keeps every token."""
    body = {"prompt": [7] * 2040, "max_tokens": 10**30, "temperature": 0, "top_k": 10**30}
    error = h.error_body(http.post(CMPL, json=body), 400, "invalid_request_error")
    assert error["code"] == "context_length_exceeded", error
    r = http.post(CMPL, json={**body, "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline([7] * 2040, 8).text


# -- sizes ----------------------------------------------------------------------------------------


def test_stop_list_of_1000_strings_is_400(http, h):
    stop = [f"stop-{i}" for i in range(1000)]
    for path, base in (
        (CMPL, {"prompt": "x"}),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}),
    ):
        error = h.error_body(http.post(path, json={**base, "max_tokens": 2, "stop": stop}), 400)
        assert error["param"] == "stop", error


def test_sixteen_huge_stop_strings_are_served(http, offline, figures):
    """16 stop strings of 60 000 characters (just under the 1 MiB body limit): served, and
    the answer is the plain greedy one (none can match). Bounded by the client timeout; the
    time against the same request without stop strings is recorded."""
    stop = [chr(ord("A") + i) * 60_000 for i in range(16)]
    body = {"prompt": "Stop strings", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    start = time.monotonic()
    r = http.post(CMPL, json={**body, "stop": stop})
    with_stop = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline("Stop strings", 64, ignore_eos=True).text
    start = time.monotonic()
    assert http.post(CMPL, json=body).status_code == 200
    figures(with_stop_s=round(with_stop, 3), without_s=round(time.monotonic() - start, 3))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CMPL, {"prompt": "word " * 5000}),
        (CMPL, {"prompt": ["short", "word " * 5000]}),
        (CMPL, {"prompt": [7] * 100_000}),
        (CMPL, {"prompt": "\U0001f600" * 60_000}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}] * 3000}),
        ("/tokenize", {"prompt": "word " * 100_000}),
    ],
    ids=["text", "second-of-two", "100k-ids", "emoji", "3000-messages", "tokenize-500kB"],
)
def test_prompt_longer_than_the_context(http, h, path, body):
    r = http.post(path, json={**body, "max_tokens": 2} if path != "/tokenize" else body)
    if path == "/tokenize":  # tokenize only counts: the count says it does not fit
        assert r.status_code == 200, r.text
        assert r.json()["count"] > r.json()["max_model_len"]
        return
    error = h.error_body(r, 400, "invalid_request_error")
    assert error["code"] == "context_length_exceeded", error


def test_10_mb_bodies_are_413(http, h):
    big = json.dumps({"prompt": "x" * 10_000_000, "max_tokens": 2}).encode()
    h.error_body(_raw(http, CMPL, big), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while it streams
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1_000_000
        yield b'", "max_tokens": 2}'

    r = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    h.error_body(r, 413)


def test_declared_huge_content_length_is_413(shared_server, canary, h):
    """A Content-Length of 10 GB is refused before the body is read (the client sent one
    byte of it)."""
    host, port = shared_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n{"
        )
        head = s.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]


# -- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"prompt": "x", "junk": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
        b'{"prompt": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}",
        b'{"messages": [{"role": "user", "content": '
        + b'[{"type": "text", "text": ' * 1000
        + b'"x"'
        + b"}]" * 1000
        + b"}]}",
        b"[" * 400_000 + b"]" * 400_000,
        b'{"prompt": "x", "max_tokens": 2' + b', "k": 1' * 100_000 + b"}",
    ],
    ids=[
        "nested-lists-200k",
        "nested-objects-100k",
        "nested-500",
        "nested-parts",
        "bare-800k",
        "100k-keys",
    ],
)
def test_deeply_nested_or_wide_json_is_400(http, h, raw):
    path = CHAT if raw.startswith(b'{"messages"') else CMPL
    r = _raw(http, path, raw)
    error = h.error_body(r, 400, "invalid_request_error")
    if raw.startswith(b'{"prompt": "x", "max_tokens": 2, "k"'):  # one key, "k", unknown
        assert error["param"] == "k", error


@pytest.mark.parametrize(
    ("raw", "ctype"),
    [
        (b'{"prompt": "\xff\xfe\xfd", "max_tokens": 2}', "application/json"),
        (b'\xef\xbb\xbf{"prompt": "bom", "max_tokens": 2}', "application/json"),
        (b'{"prompt": "x", "max_tokens": 2}', "text/plain"),
        (b"prompt=x&max_tokens=2", "application/x-www-form-urlencoded"),
        (b'{"prompt": "x", "max_tokens": 2, "stream": "yes please"}', "application/json"),
        (b'{"prompt": "x", "max_tokens": 2}\x00\x00', "application/json"),
        (b'{"prompt": "x", "prompt": 5}', "application/json"),
    ],
    ids=["invalid-utf8", "bom", "text-plain", "form", "stream-string", "trailing-nul", "dup-key"],
)
def test_malformed_bodies_are_4xx_with_error_object(http, h, raw, ctype):
    r = _raw(http, CMPL, raw, ctype)
    _is_4xx_error_or_200(r, h)
    if r.status_code == 200:  # only if it is a request we can read as meant
        assert r.json()["choices"][0]["text"] is not None


# -- the server kept serving ----------------------------------------------------------------------


def test_canary_streams_were_exact_throughout(canary, shared_server, h, figures):
    """Runs last in this module: the canary streamed during every test above."""
    assert canary.thread.is_alive(), "the canary stopped early"
    canary.stop.set()
    canary.thread.join(timeout=120)
    assert not canary.thread.is_alive()
    idle = h.wait_idle(shared_server.url)
    figures(
        canary_requests=canary.done,
        canary_failures=len(canary.errors),
        kv_blocks_after=h.kv_blocks_used(shared_server.url),
    )
    assert canary.done >= 3, canary.done
    assert not canary.errors, "\n".join(canary.errors[:10])
    assert idle["kv"] == 0
