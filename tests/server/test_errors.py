"""Every error status comes with OpenAI's error object, and nothing is ever a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
C = {"prompt": "hi", "max_tokens": 2}
M = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("negative temperature", CMPL, {**C, "temperature": -0.5}),
    ("temperature over 2", CHAT, {**M, "temperature": 2.5}),
    ("top_p 0", CMPL, {**C, "top_p": 0}),
    ("top_p over 1", CHAT, {**M, "top_p": 1.5}),
    ("top_k -2", CMPL, {**C, "top_k": -2}),
    ("n 0", CMPL, {**C, "n": 0}),
    ("n 0 chat", CHAT, {**M, "n": 0}),
    ("max_tokens 0", CMPL, {**C, "max_tokens": 0}),
    ("max_tokens negative chat", CHAT, {**M, "max_tokens": -3}),
    ("presence_penalty 3", CMPL, {**C, "presence_penalty": 3}),
    ("logprobs 21", CMPL, {**C, "logprobs": 21}),
    ("top_logprobs 21", CHAT, {**M, "logprobs": True, "top_logprobs": 21}),
    ("negative seed", CMPL, {**C, "seed": -1}),
    ("17 stop strings", CMPL, {**C, "stop": [f"s{i}" for i in range(17)]}),
    ("n x prompts over 256", CMPL, {**C, "prompt": ["a"] * 17, "n": 16}),
    ("temperature wrong type", CMPL, {**C, "temperature": "hot"}),
    ("max_tokens wrong type", CMPL, {**C, "max_tokens": "many"}),
    ("n wrong type", CHAT, {**M, "n": [2]}),
    ("prompt wrong type", CMPL, {**C, "prompt": 5}),
    ("prompt object", CMPL, {**C, "prompt": {"text": "hi"}}),
    ("stop wrong type", CMPL, {**C, "stop": 7}),
    ("messages wrong type", CHAT, {**M, "messages": "hi"}),
    ("message without content", CHAT, {**M, "messages": [{"role": "user"}]}),
    ("missing prompt", CMPL, {"max_tokens": 2}),
    ("empty prompt list", CMPL, {**C, "prompt": []}),
    ("empty token-id prompt in a list", CMPL, {**C, "prompt": [[]]}),
    ("token id out of vocab", CMPL, {**C, "prompt": [0, 5, 8192]}),
    ("negative token id", CMPL, {**C, "prompt": [0, -1]}),
    ("token id out of vocab in a list", CMPL, {**C, "prompt": [[0, 5], [99999]]}),
    ("prompt longer than the context", CMPL, {**C, "prompt": [7] * 2048}),
    ("unknown message role", CHAT, {**M, "messages": [{"role": "wizard", "content": "hi"}]}),
    ("missing messages", CHAT, {"max_tokens": 2}),
    ("empty messages", CHAT, {**M, "messages": []}),
    (
        "chat prompt longer than the context",
        CHAT,
        {**M, "messages": [{"role": "user", "content": "word " * 2100}]},
    ),
]


@pytest.mark.parametrize(
    ("path", "body"), [(p, b) for _, p, b in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS]
)
def test_invalid_request_is_400(http, error_body, path, body):
    error = error_body(http.post(path, json=body), 400, "invalid_request_error")
    assert error["code"] is None or isinstance(error["code"], str)


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_streamed_invalid_request_is_400_before_any_event(http, error_body, path):
    body = {**(C if path == CMPL else M), "temperature": -1, "stream": True}
    error_body(http.post(path, json=body), 400, "invalid_request_error")


def test_context_overflow_says_so(http, error_body):
    error = error_body(http.post(CMPL, json={**C, "prompt": [7] * 2048}), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"
    assert "2048" in error["message"]


def test_prompt_that_leaves_one_token_of_room_is_served(http):
    r = http.post(CMPL, json={"prompt": [7] * 2047, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    details = usage.pop("prompt_tokens_details")
    assert usage == {"prompt_tokens": 2047, "completion_tokens": 1, "total_tokens": 2048}
    assert 0 <= details["cached_tokens"] < 2047
    assert body["choices"][0]["finish_reason"] == "length"


def test_validation_error_names_the_parameter(http, error_body):
    error = error_body(http.post(CMPL, json={**C, "temperature": -1}), 400)
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]
    error = error_body(http.post(CMPL, json={**C, "prompt": [0, 9000]}), 400)
    assert error["param"] == "prompt"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[1, 2, 3]", b'"a string"', b'{"prompt": "hi", "max_tokens": 2'],
    ids=["garbage", "empty", "array", "string", "truncated"],
)
def test_unparsable_body_is_400(http, error_body, raw):
    r = http.post(CMPL, content=raw, headers={"content-type": "application/json"})
    error_body(r, 400, "invalid_request_error")


def test_unknown_model_is_404(http, error_body):
    for path, body in ((CMPL, C), (CHAT, M)):
        error = error_body(http.post(path, json={**body, "model": "gpt-4"}), 404)
        assert error["code"] == "model_not_found"
        assert error["param"] == "model"
        assert "gpt-4" in error["message"]


def test_served_model_name_is_accepted(http, model_name):
    r = http.post(CMPL, json={**C, "model": model_name})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model_name


def test_unknown_route_and_wrong_method_have_error_bodies(http, error_body):
    error_body(http.get("/v1/nothing-here"), 404)
    error_body(http.get(CMPL), 405)


def test_tokenize_errors(http, error_body):
    error_body(http.post("/tokenize", json={}), 400)
    error_body(http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)
    error_body(http.post("/detokenize", json={"tokens": [8192]}), 400)
    r = http.post("/tokenize", json={"prompt": "hi"})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"])


# -- 401: a server with an API key (and a small body limit for 413) -----------------------------

KEY = "sk-test-0123456789"
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def locked(launch_server):
    server = launch_server("--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT))
    yield server
    server.stop()


ENDPOINTS = [("GET", "/v1/models", None), ("POST", CMPL, C), ("POST", CHAT, M)]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=lambda x: str(x))
def test_api_key_is_required(locked, error_body, method, path, body):
    with httpx.Client(base_url=locked.url, timeout=30.0) as client:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},  # no "Bearer "
            {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": f"Basic {KEY}"},
        ):
            r = client.request(method, path, json=body, headers=headers)
            error = error_body(r, 401, "authentication_error")
            assert error["code"] == "invalid_api_key"
            assert KEY not in r.text
        r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text


def test_auth_comes_before_validation(locked, error_body):
    # an unauthenticated caller learns nothing about the request's validity
    with httpx.Client(base_url=locked.url, timeout=30.0) as client:
        error_body(client.post(CMPL, json={"prompt": "x", "temperature": -1}), 401)
        error_body(client.post(CMPL, json={**C, "model": "nope"}), 401)


def test_probes_and_metrics_stay_open(locked):
    with httpx.Client(base_url=locked.url, timeout=30.0) as client:
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200, path


def test_openai_client_with_key(locked, model_name):
    import openai

    good = openai.OpenAI(base_url=locked.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    r = good.completions.create(model=model_name, prompt="hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=locked.url + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model_name, messages=M["messages"], max_tokens=2)


# -- 413 ------------------------------------------------------------------------------------------


def test_body_over_limit_is_413(locked, error_body):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {**C, "prompt": "x" * (BODY_LIMIT + 10)}
    with httpx.Client(base_url=locked.url, timeout=30.0) as client:
        error = error_body(client.post(CMPL, json=big, headers=auth), 413)
        assert str(BODY_LIMIT) in error["message"]
        # the limit holds before authentication too
        error_body(client.post(CMPL, json=big), 413)
        # just under the limit is fine (the bulk in a field that costs no context)
        ok = {**C, "user": "u" * (BODY_LIMIT - 200)}
        assert BODY_LIMIT - 200 < len(json.dumps(ok)) < BODY_LIMIT
        r = client.post(CMPL, json=ok, headers=auth)
        assert r.status_code == 200, r.text


def test_chunked_body_over_limit_is_413(locked, error_body):
    """No Content-Length: the limit is enforced while the body streams in."""
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    chunk = b" " * 1024

    def body():
        yield b'{"prompt": "hi", "max_tokens": 2'
        for _ in range(2 * BODY_LIMIT // len(chunk)):
            yield chunk
        yield b"}"

    with httpx.Client(base_url=locked.url, timeout=30.0) as client:
        r = client.post(CMPL, content=body(), headers=auth)
        assert "content-length" not in {k.lower() for k in r.request.headers}
        error_body(r, 413)
        # and a chunked body under the limit is served
        small = iter([b'{"prompt": "hi", ', b'"max_tokens": 2}'])
        r = client.post(CMPL, content=small, headers=auth)
        assert r.status_code == 200, r.text
