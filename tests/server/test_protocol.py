"""HTTP details a client or proxy relies on: 405 names the allowed methods, 401 names the
scheme (matched case-insensitively), bodies the document accepts are the bodies served, and
the OpenAPI document states what is sent (400 not 422, text metrics, SSE streams)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from packserve.server.launcher import ServerProcess

KEY = "test-key-7"


@pytest.fixture(scope="module")
def locked(launch_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    with launch_server("--api-key", KEY, "--max-num-seqs", "4") as s:
        yield s


def post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    auth = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(server.url + path, json=body, headers=auth, timeout=60)


def test_405_names_the_allowed_methods(locked: ServerProcess) -> None:
    r = httpx.get(locked.url + "/v1/completions", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.delete(locked.url + "/v1/models", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        (f"Bearer {KEY}", 200),
        (f"bearer {KEY}", 200),  # auth schemes are case-insensitive (RFC 9110 11.1)
        (f"BEARER  {KEY}", 200),
        (f"Basic {KEY}", 401),
        ("Bearer wrong", 401),
        (f"Bearer{KEY}", 401),
    ],
)
def test_bearer_scheme(locked: ServerProcess, header: str | None, status: int) -> None:
    headers = {"Authorization": header} if header else {}
    r = httpx.get(locked.url + "/v1/models", headers=headers, timeout=30)
    assert r.status_code == status
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, None),
        ("/tokenize", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [[]]}, "prompt.0"),
        ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt.1"),
    ],
)
def test_bodies_the_schema_refuses_are_400(
    locked: ServerProcess, path: str, body: dict, param: str | None
) -> None:
    r = post(locked, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param and error["message"].startswith(param + ":")


def test_tokenize_either_form(locked: ServerProcess) -> None:
    plain = post(locked, "/tokenize", {"prompt": "hello"})
    chat = post(locked, "/tokenize", {"messages": [{"role": "user", "content": "hello"}]})
    assert plain.status_code == chat.status_code == 200
    assert 0 < plain.json()["count"] < chat.json()["count"]  # the template adds its tokens


def test_openapi_states_what_is_sent(locked: ServerProcess) -> None:
    doc = httpx.get(locked.url + "/openapi.json", timeout=30).json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path}"
            if "requestBody" in operation:
                bad = responses["400"]["content"]["application/json"]["schema"]["$ref"]
                assert bad.endswith("/ErrorResponse"), f"{method} {path}"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content)
    metrics = httpx.get(locked.url + "/metrics", timeout=30)
    assert metrics.headers["content-type"].startswith("text/plain")


def test_a_full_queue_is_no_secret_to_callers_without_the_key(
    launch_server: Callable[..., ServerProcess],
) -> None:
    """The 429 fast path (before the body is read) answers only callers with the key; the
    others get 401 whatever the queue holds."""
    flags = ("--api-key", KEY, "--max-num-seqs", "1", "--max-queued-requests", "1")
    with launch_server(*flags) as server, httpx.Client(timeout=60) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        long = {"prompt": "A", "max_tokens": 1900, "ignore_eos": True, "stream": True}
        with client.stream("POST", server.url + "/v1/completions", json=long, headers=auth) as a:
            assert a.status_code == 200
            lines = a.iter_lines()  # kept: a dropped iterator closes the stream (and aborts A)
            next(lines)  # A runs in the only seat
            queued = {"prompt": "B", "max_tokens": 1900, "ignore_eos": True, "stream": True}
            with client.stream(
                "POST", server.url + "/v1/completions", json=queued, headers=auth
            ) as b:
                assert b.status_code == 200  # B waits: the queue of 1 is full
                body = {"prompt": "C", "max_tokens": 2}
                for path in ("/v1/completions", "/v1/chat/completions"):
                    anonymous = client.post(server.url + path, json=body)
                    assert anonymous.status_code == 401, anonymous.text
                    keyed = client.post(server.url + path, json=body, headers=auth)

                    assert keyed.status_code == 429, keyed.text
                    assert keyed.headers["retry-after"] == "1"
