"""Auth: with --api-key, every route the app documents is refused without the right key
(401, OpenAI error object, code invalid_api_key), except an explicit list of open ones
(probes, metrics, dashboard). The routes come from the server's own /openapi.json, so a new
route is protected by default or this test fails."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

# Open on purpose (SECURITY.md): probes, scraping, the dashboard and its feed.
OPEN = {("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"), ("GET", "/dashboard/feed")}
OPEN_UNDOCUMENTED = ["/dashboard", "/openapi.json", "/docs"]
# Routes that must be there (a sanity check on the enumeration itself).
MUST_BE_PROTECTED = {
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
}
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [0, 300]},
    "/v1/load_lora_adapter": {"lora_name": "x", "lora_path": "/nonexistent"},
    "/v1/unload_lora_adapter": {"lora_name": "x"},
}
# Routes off unless a flag turns them on (not on this server): with the key, 403 says so.
OFF_BY_FLAG = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


@pytest.fixture(scope="module")
def routes(locked_server) -> list[tuple[str, str]]:
    r = httpx.get(locked_server.url + "/openapi.json", timeout=30)  # open: the API's shape
    assert r.status_code == 200, r.text
    return sorted(
        (method.upper(), path)
        for path, item in r.json()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    )


def _bad_headers(key: str) -> list[dict[str, Any]]:
    return [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {key}x"},
        {"Authorization": f"Bearer {key[:-1]}"},
        {"Authorization": key},
        {"Authorization": f"Basic {key}"},
        {"X-API-Key": key},
        {"Authorization": f"Bearer {key}\u00e9".encode()},  # bytes: not ASCII
    ]


def test_every_documented_route_is_protected_or_explicitly_open(
    locked_server, routes, api_key, h, figures
):
    found = set(routes)
    assert found >= MUST_BE_PROTECTED, MUST_BE_PROTECTED - found
    protected = [r for r in routes if r not in OPEN]
    checked = 0
    with httpx.Client(base_url=locked_server.url, timeout=h.HTTP_TIMEOUT) as client:
        key = {"Authorization": f"Bearer {api_key}"}
        served = client.get("/v1/models", headers=key).json()["data"][0]["id"]
        for method, template in protected:
            path = template.format(model_id=served)  # /v1/models/{model_id}: the served one
            body = VALID_BODIES.get(path, {}) if method != "GET" else None
            streams = path in ("/v1/completions", "/v1/chat/completions")
            variants = [body, {**body, "stream": True}] if body and streams else [body]
            for payload in variants:
                for headers in _bad_headers(api_key):
                    r = client.request(method, path, json=payload, headers=headers)
                    error = h.error_body(r, 401, "authentication_error")
                    assert error["code"] == "invalid_api_key", (method, path, headers, error)
                    assert api_key not in r.text
                    checked += 1
                # and the same with the key is served (so the 401 was about the key)
                ok = client.request(method, path, json=payload, headers=key)
                expected = 403 if path in OFF_BY_FLAG else 200
                assert ok.status_code == expected, (method, path, ok.text[:300])
    figures(
        routes=len(routes),
        protected=len(protected),
        open=len(routes) - len(protected),
        refusals_checked=checked,
        failures=0,
    )


def test_auth_is_checked_before_the_body_is_validated(locked_server, routes, h):
    """An unauthenticated caller learns nothing about its request: an invalid (but
    well-formed) body still gets 401, not 400/404."""
    bad = {"prompt": "x", "temperature": -1, "model": "nope", "messages": "no", "tokens": "no"}
    with httpx.Client(base_url=locked_server.url, timeout=h.HTTP_TIMEOUT) as client:
        for method, path in routes:
            if (method, path) in OPEN or method == "GET":
                continue
            h.error_body(client.request(method, path, json=bad), 401, "authentication_error")
            h.error_body(client.request(method, path, json={}), 401, "authentication_error")


def test_open_routes_need_no_key_and_ignore_a_wrong_one(locked_server, routes, api_key, h):
    open_paths = [p for m, p in routes if (m, p) in OPEN] + OPEN_UNDOCUMENTED
    assert {p for _, p in OPEN} <= set(open_paths)
    with httpx.Client(base_url=locked_server.url, timeout=h.HTTP_TIMEOUT) as client:
        for path in open_paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = client.get(path, headers=headers)
                assert r.status_code == 200, (path, headers, r.status_code)
                assert api_key not in r.text, path


def test_unknown_v1_route_does_not_leak_without_a_key(locked_server, h):
    """Unknown routes: 404 (or 401) with an error object, never anything else."""
    with httpx.Client(base_url=locked_server.url, timeout=h.HTTP_TIMEOUT) as client:
        for method, path in (("GET", "/v1/secret"), ("POST", "/v1/embeddings")):
            r = client.request(method, path)
            assert r.status_code in (401, 404), r.status_code
            h.error_body(r, r.status_code)
