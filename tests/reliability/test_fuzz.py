"""Fuzzing with schemathesis against the running server's own OpenAPI document: for every
route it documents, schema-valid and schema-violating requests never get a 5xx, every 4xx
carries an OpenAI error object, every status and body is one the document declares.

Bounded: at most 50 examples per operation and mode (valid / invalid), derandomized so CI
sees the same cases every run, against a server with a 128-token context; valid bodies get
`max_tokens` <= 8 and `n` <= 4 so the tiny model answers at once (the limits themselves are
tested by hand in test_nasty_inputs.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/version"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/dashboard/feed"),
]
MAX_EXAMPLES = 50


@pytest.fixture(scope="module")
def schema(locked_server, api_key):
    return schemathesis.openapi.from_url(
        locked_server.url + "/openapi.json", headers={"Authorization": f"Bearer {api_key}"}
    )


def _cheap(body: Any) -> Any:
    """Keep a valid body's work small: few tokens, few choices (JSON numbers like 7.0 are
    valid integers too)."""
    if isinstance(body, dict):
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 8  # chat's default is the whole context left
        for key, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 4)):
            if isinstance(body.get(key), int | float) and body[key] > cap:
                body[key] = cap
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            body["prompt"] = prompt[:4]
    return body


def _error_object(body: Any) -> str | None:
    """What is wrong with an OpenAI error object, or None."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return "not {'error': {...}}"
    error = body["error"]
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return "error lacks message/type/param/code"
    if not (isinstance(error["message"], str) and error["message"]):
        return "empty message"
    if not (isinstance(error["type"], str) and error["type"]):
        return "empty type"
    return None


# Routes that take no input, or only a free string in the path, cannot be sent
# schema-violating requests.
NO_INPUT = {"/v1/models", "/v1/models/{model_id}", "/version", "/health", "/ready", "/metrics"}
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if not (mode == GenerationMode.NEGATIVE and path in NO_INPUT)
]


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=[f"{p}-{m.value}" for _, p, m in CASES]
)
def test_fuzz_operation(schema, locked_server, api_key, h, figures, method, path, mode):
    operation = schema[path][method]
    statuses: dict[int, int] = {}
    problems: list[str] = []
    slowest = 0.0
    auth = {"Authorization": f"Bearer {api_key}"}

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        nonlocal slowest
        if mode == GenerationMode.POSITIVE:
            case.body = _cheap(case.body)
        start = time.monotonic()
        response = case.call(base_url=locked_server.url, headers=auth, timeout=60)
        slowest = max(slowest, time.monotonic() - start)
        status = response.status_code
        statuses[status] = statuses.get(status, 0) + 1
        sent = response.request.body
        sent = sent[:300] if isinstance(sent, (bytes, str)) else sent
        if status >= 500:
            problems.append(f"{status} for {sent!r}: {response.content[:300]!r}")
        elif status >= 400:
            try:
                body = json.loads(response.content)
            except ValueError:
                body = None
            wrong = _error_object(body)
            ctype = response.headers.get("content-type", [""])[0]
            if wrong or not ctype.startswith("application/json"):
                problems.append(
                    f"{status} {ctype} for {sent!r}: {wrong}: {response.content[:300]!r}"
                )
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            headers=auth,
        )

    start = time.monotonic()
    fuzz()
    figures(
        requests=sum(statuses.values()),
        statuses=dict(sorted(statuses.items())),
        failures=len(problems),
        seconds=round(time.monotonic() - start, 1),
        slowest_s=round(slowest, 2),
    )
    assert not problems, "\n".join(problems[:10])
    # the fuzzer left nothing behind
    h.wait_idle(locked_server.url, timeout=60)
