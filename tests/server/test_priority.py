"""The `priority` request field (vLLM's): an integer within 32 bits, default 0, lower runs
first. Bad values are refused with OpenAI's error object naming the field; good ones are
served, whole and streamed. (The order it gives is tested with the scheduler.)"""

from __future__ import annotations

from typing import Any

import openai
import pytest

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
BODIES = {
    CMPL: {"prompt": "priority probe", "max_tokens": 2},
    CHAT: {"messages": [{"role": "user", "content": "priority probe"}], "max_tokens": 2},
}
BAD: list[tuple[str, Any]] = [
    ("fraction", 1.5),
    ("whole float", 1.0),  # a JSON integer only: no silent coercion
    ("string", "1"),
    ("bool", True),
    ("null", None),
    ("list", [1]),
    ("over int32", 2**31),
    ("under int32", -(2**31) - 1),
    ("huge", 10**30),
]
GOOD = [0, 1, -1, 7, 2**31 - 1, -(2**31)]


@pytest.mark.parametrize("path", [CMPL, CHAT], ids=["completions", "chat"])
@pytest.mark.parametrize("value", [v for _, v in BAD], ids=[n for n, _ in BAD])
def test_bad_priority_is_400_naming_the_field(http, error_body, path, value):
    error = error_body(http.post(path, json={**BODIES[path], "priority": value}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "priority"
    assert "priority" in error["message"]


@pytest.mark.parametrize("path", [CMPL, CHAT], ids=["completions", "chat"])
def test_bad_priority_streamed_is_400_before_any_event(http, error_body, path):
    body = {**BODIES[path], "priority": 2**31, "stream": True}
    error = error_body(http.post(path, json=body), 400)
    assert error["param"] == "priority"


@pytest.mark.parametrize("path", [CMPL, CHAT], ids=["completions", "chat"])
def test_valid_priorities_are_served(http, path):
    for value in GOOD:
        r = http.post(path, json={**BODIES[path], "priority": value, "n": 2})
        assert r.status_code == 200, (value, r.text)
        body = r.json()
        assert len(body["choices"]) == 2
        assert body["usage"]["completion_tokens"] >= 2  # every choice generated
    r = http.post(path, json=BODIES[path])  # absent: the default, 0
    assert r.status_code == 200, r.text


def test_priority_streamed(http, parse_sse):
    body = {**BODIES[CMPL], "priority": -3, "stream": True, "max_tokens": 3, "ignore_eos": True}
    with http.stream("POST", CMPL, json=body) as r:
        assert r.status_code == 200
        events = parse_sse(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_official_client_passes_priority(oai, model_name):
    """The openai client sends vLLM's extension fields through extra_body."""
    r = oai.completions.create(
        model=model_name, prompt="priority probe", max_tokens=2, extra_body={"priority": -10}
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(
            model=model_name, prompt="priority probe", max_tokens=2, extra_body={"priority": "x"}
        )
    assert info.value.status_code == 400
    assert info.value.body["param"] == "priority"
