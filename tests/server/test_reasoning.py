"""`--reasoning-parser qwen3` against a real server: the think block goes to reasoning_content,
whole and streamed; without the flag it stays in the content; completions are never split.
The tiny model never thinks by itself, so a regex constraint makes it write a think block."""

from __future__ import annotations

import re
import shutil
from typing import Any

import httpx
import pytest

from packserve.engine.tools import ToolCall
from packserve.server.launcher import ServerProcess
from packserve.server.tool_calls import Reasoning, ToolPlan

WORD = "[a-z]{1,8}"
THINKING = {"structured_outputs": {"regex": f"<think>{WORD}</think>{WORD}"}}
USER = [{"role": "user", "content": "Think, then answer."}]


@pytest.fixture(scope="module")
def thinking_server(launch_server) -> ServerProcess:
    server = launch_server("--reasoning-parser", "qwen3")
    yield server
    server.stop(timeout=10)


def chat(server: ServerProcess, **extra: Any) -> httpx.Response:
    body = {"messages": USER, "max_tokens": 40, "temperature": 0, **THINKING, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_think_block_goes_to_reasoning_content(thinking_server):
    r = chat(thinking_server, n=2, temperature=1.0, seed=5)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        message = choice["message"]
        assert re.fullmatch(WORD, message["reasoning_content"]), message
        assert re.fullmatch(WORD, message["content"]), message
        assert choice["finish_reason"] == "stop"


def test_streamed_reasoning_reassembles_to_the_whole_response(thinking_server, parse_sse):
    whole = chat(thinking_server).json()["choices"][0]["message"]
    with httpx.stream(
        "POST",
        thinking_server.url + "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 40, "temperature": 0, "stream": True, **THINKING},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        events = parse_sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in events[:-1]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == (whole["reasoning_content"], whole["content"])
    # every reasoning delta comes before the first content piece
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=lambda k: k == "content")
    assert "reasoning_content" in kinds and "content" in kinds


def test_output_without_a_think_block_is_all_content(thinking_server):
    r = chat(thinking_server, structured_outputs={"regex": WORD})
    message = r.json()["choices"][0]["message"]
    assert re.fullmatch(WORD, message["content"]) and message["reasoning_content"] is None


def test_without_the_flag_the_tags_stay_in_the_content(server):
    r = chat(server)
    message = r.json()["choices"][0]["message"]
    assert re.fullmatch(f"<think>{WORD}</think>{WORD}", message["content"]), message
    assert "reasoning_content" not in message


def test_a_block_the_template_opens_is_reasoning_from_the_start(
    launch_server, tiny_model_dir, tmp_path, parse_sse
):
    """A template that ends the prompt with `<think>` (as Qwen3's thinking ones do): the output
    starts as reasoning, so it streams as reasoning before any `</think>` arrives."""
    model = tmp_path / "opens-think"
    shutil.copytree(tiny_model_dir, model)
    template = model / "chat_template.jinja"
    text = template.read_text()
    assert "'<|assistant|>\n'" in text
    template.write_text(text.replace("'<|assistant|>\n'", "'<|assistant|>\n<think>\n'"))
    server = launch_server("--model", str(model), "--reasoning-parser", "qwen3")
    regex = {"structured_outputs": {"regex": f"{WORD}</think>{WORD}"}}
    r = chat(server, **regex)
    message = r.json()["choices"][0]["message"]
    assert re.fullmatch(WORD, message["reasoning_content"]), message
    assert re.fullmatch(WORD, message["content"]), message
    # unclosed (cut by max_tokens): all reasoning, streamed as it comes
    unclosed = {"structured_outputs": {"regex": "[a-z]{20,30}"}, "max_tokens": 4}
    message = chat(server, **unclosed).json()["choices"][0]["message"]
    assert message["content"] == "" and message["reasoning_content"], message
    body = {"messages": USER, "temperature": 0, "stream": True, **unclosed}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [c["choices"][0] for c in parse_sse(r.iter_lines())[:-1]]
    thoughts = [
        c["delta"]["reasoning_content"] for c in chunks if c["delta"].get("reasoning_content")
    ]
    assert len(thoughts) > 1 and "".join(thoughts) == message["reasoning_content"]
    assert not any(c["delta"].get("content") for c in chunks)
    server.stop(timeout=10)


def test_completions_are_not_split(thinking_server):
    r = httpx.post(
        thinking_server.url + "/v1/completions",
        json={"prompt": "Think:", "max_tokens": 40, **THINKING},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert re.fullmatch(f"<think>{WORD}</think>{WORD}", choice["text"]), choice


def test_tool_calls_are_read_from_the_content_only():
    """A call written inside the think block is reasoning; one after it is a call."""
    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    text = f"<think>maybe {call}</think>\n{call}"
    message = ToolPlan("auto").reader("start").message(text)
    assert message["reasoning_content"] == f"maybe {call}"
    assert message["content"] is None
    (made,) = message["tool_calls"]
    assert made["function"] == {"name": "f", "arguments": '{"x": 1}'}
    reader = ToolPlan("auto").reader("start")  # streamed a character at a time
    items = [i for piece in text for i in reader.push(piece)] + reader.finish()
    assert "".join(i.text for i in items if isinstance(i, Reasoning)) == f"maybe {call}"
    assert [i.name for i in items if isinstance(i, ToolCall)] == ["f"]
    assert not [i for i in items if isinstance(i, str)]
