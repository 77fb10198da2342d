"""Tool calling through the official client against real servers: tools shown to the model,
tool history accepted, tool_calls whole and streamed, required and named choices enforced by
the grammar, bad tool requests refused with 400s naming the field."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import TypeAdapter

from packserve.server.protocol import ChatMessage
from packserve.server.tool_calls import conversation, template_renders_tools
from packserve.server.tool_protocol import Tool

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
GET_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


HISTORY = [
    *USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def reassemble(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """A stream's content, its calls by index (id, name, arguments) and its finish reason,
    checking OpenAI's shape: a call's first delta has its id, type and name, later ones only
    argument pieces."""
    content = ""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id and piece.id.startswith("call_") and piece.type == "function"
                    assert piece.function.name
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name}
                    calls[piece.index]["arguments"] = piece.function.arguments or ""
                else:
                    assert piece.id is None and piece.function.name is None
                    calls[piece.index]["arguments"] += piece.function.arguments
            finish = choice.finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))
    return content, calls, finish


# -- request side ---------------------------------------------------------------------------


def test_tools_reach_the_prompt_unless_tool_choice_is_none(oai, model_name):
    def prompt_tokens(**extra: Any) -> int:
        r = oai.chat.completions.create(
            model=model_name, messages=USER, max_tokens=1, temperature=0, **extra
        )
        assert r.choices[0].message.tool_calls is None
        return r.usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain
    assert prompt_tokens(tool_choice="auto") == plain  # nothing to show
    assert prompt_tokens(tools=TOOLS) > plain  # auto: the tiny template ignores tools, a
    # system section shows them


def test_tool_history_is_rendered_in_the_call_format(http, tokenizer):
    r = http.post("/tokenize", json={"messages": HISTORY})
    assert r.status_code == 200, r.text
    text = tokenizer.decode(r.json()["tokens"])
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert text.index("<tool_call>") < text.index("<tool_response>")


def test_tool_call_parser_flag_picks_the_format(launch_server, tokenizer):
    server = launch_server("--tool-call-parser", "smollm2")
    r = httpx.post(server.url + "/tokenize", json={"messages": HISTORY}, timeout=60)
    assert r.status_code == 200, r.text
    text = tokenizer.decode(r.json()["tokens"])
    assert (
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>' in text
    )
    server.stop(timeout=10)


def test_round_trip_with_a_tool_result_turn(oai, model_name):
    messages: list[Any] = [*USER]
    first = oai.chat.completions.create(
        model=model_name, messages=messages, tools=TOOLS, tool_choice=GET_WEATHER, max_tokens=24
    )
    message = first.choices[0].message
    (made,) = message.tool_calls
    assert made.id.startswith("call_") and made.type == "function"
    assert made.function.name == "get_weather"
    messages.append(message)  # the SDK's own message object, sent back as agents do
    messages.append({"role": "tool", "tool_call_id": made.id, "content": "18 C, sunny"})
    second = oai.chat.completions.create(
        model=model_name, messages=messages, tools=TOOLS, max_tokens=8
    )
    assert second.choices[0].message.role == "assistant"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_native_template_gets_tools_and_history_as_transformers_expects(tokenizer):
    """A template that renders tools (like Qwen's) gets them and the history unchanged in
    meaning: calls with object arguments, results as tool turns; no system section added."""
    native = copy.deepcopy(tokenizer)
    native.chat_template = (
        "{% if tools %}TOOLS{{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}"
        "CALL{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"
        "{% if m.role == 'tool' %}FOR{{ m.tool_call_id }}:{{ m.name }}{% endif %}\n{% endfor %}"
    )
    assert template_renders_tools(native) and not template_renders_tools(tokenizer)
    messages = TypeAdapter(list[ChatMessage]).validate_python(HISTORY)
    tools = [Tool.model_validate(t) for t in TOOLS]
    turns = conversation(messages, tools, "hermes", native=True)
    text = native.apply_chat_template(turns, tools=TOOLS, tokenize=False)
    assert text.startswith("TOOLS[")
    assert 'CALLget_weather{"city": "Paris"}' in text
    assert "[tool]18 C, sunny" in text and "FORcall_1:get_weather" in text
    assert "<tool_call>" not in text and "[system]" not in text


# -- whole and streamed ---------------------------------------------------------------------


def assert_stream_matches_whole(oai, params: dict) -> str | None:
    """The same request whole and streamed: no content, the same calls, the same finish
    reason (returned)."""
    whole = oai.chat.completions.create(**params).choices[0]
    content, calls, finish = reassemble(list(oai.chat.completions.create(**params, stream=True)))
    assert whole.message.content is None and content == ""
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (c["name"], c["arguments"]) for c in calls.values()
    ]
    assert finish == whole.finish_reason
    return finish


def test_streamed_tool_calls_reassemble_to_the_whole_response(oai, model_name):
    params = dict(
        model=model_name,
        messages=USER,
        tools=TOOLS,
        tool_choice=GET_WEATHER,
        max_tokens=40,
        temperature=0,
    )
    assert_stream_matches_whole(oai, params)


# -- enforced by the grammar ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_named_choice_gives_arguments_valid_for_the_schema(oai, model_name, seed):
    r = oai.chat.completions.create(
        model=model_name,
        messages=USER,
        tools=TOOLS,
        tool_choice=GET_WEATHER,
        max_tokens=64,
        seed=seed,
    )
    choice = r.choices[0]
    (made,) = choice.message.tool_calls
    assert made.function.name == "get_weather"
    jsonschema.validate(json.loads(made.function.arguments), WEATHER_PARAMS)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None


@pytest.mark.parametrize("parallel", [False, True])
def test_required_gives_at_least_one_valid_call(oai, model_name, parallel):
    r = oai.chat.completions.create(
        model=model_name,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=96,
        seed=7,
    )
    choice = r.choices[0]
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for made in calls:
        jsonschema.validate(json.loads(made.function.arguments), SCHEMAS[made.function.name])
    assert choice.finish_reason == "tool_calls"


# -- refused --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, param",
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tools": None, "tool_choice": GET_WEATHER}, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "12"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "robot", "content": "12"}]}, "messages.0"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages.0"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(http, error_body, change, param):
    body = {"messages": USER, "tools": TOOLS, "max_tokens": 1, **change}
    r = http.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
    error = error_body(r, 400, "invalid_request_error")
    assert error["param"] is not None and error["param"].startswith(param), error


def test_a_function_without_parameters_takes_none(oai, model_name):
    """OpenAI's rule: omitting parameters defines a function with no arguments."""
    tools = [{"type": "function", "function": {"name": "ping"}}]
    r = oai.chat.completions.create(
        model=model_name, messages=USER, tools=tools, max_tokens=2, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# -- SmolLM2, calling tools by itself -------------------------------------------------------

FEW_SHOT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})],
    },
    {"role": "user", "content": "What is the weather in Madrid?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("call_2", "get_weather", {"city": "Madrid"})],
    },
]
WEATHER_ONLY = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def smollm2_oai(smollm2_server) -> openai.OpenAI:
    url = smollm2_server.url + "/v1"
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120.0)


@pytest.mark.parametrize("city", ["Berlin", "Tokyo"])
def test_smollm2_calls_a_tool_by_itself(smollm2_oai, city):
    """SmolLM2-135M, shown the tools in its format (smollm2, picked by its template) and
    two earlier calls, calls the tool for a new city: parsed into tool_calls, whole and
    streamed alike."""
    params = dict(
        model=smollm2_oai.models.list().data[0].id,
        messages=[*FEW_SHOT, {"role": "user", "content": f"What is the weather in {city}?"}],
        tools=WEATHER_ONLY,
        max_tokens=40,
        temperature=0,
    )
    whole = smollm2_oai.chat.completions.create(**params).choices[0]
    (made,) = whole.message.tool_calls
    assert (made.function.name, json.loads(made.function.arguments)) == (
        "get_weather",
        {"city": city},
    )
    assert whole.message.content is None and whole.finish_reason == "tool_calls"
    content, calls, finish = reassemble(
        list(smollm2_oai.chat.completions.create(**params, stream=True))
    )
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("get_weather", made.function.arguments)
    ]


# -- other clients: LangChain and LiteLLM agent turns ---------------------------------------


def test_langchain_bind_tools_agent_turn(smollm2_server, smollm2_dir):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city"""
        return f"18 C in {city}"

    llm = ChatOpenAI(
        base_url=smollm2_server.url + "/v1",
        api_key="x",  # type: ignore[arg-type]
        model=smollm2_dir.name,
        temperature=0,
        max_tokens=40,  # type: ignore[call-arg]
        max_retries=0,
    ).bind_tools([get_weather])
    history = [
        HumanMessage("What is the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]),
        HumanMessage("What is the weather in Madrid?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Madrid"}, "id": "c2"}]),
        HumanMessage("What is the weather in Berlin?"),
    ]
    answer = llm.invoke(history)
    assert [(c["name"], c["args"]) for c in answer.tool_calls] == [
        ("get_weather", {"city": "Berlin"})
    ]
    (made,) = answer.tool_calls
    result = ToolMessage(get_weather.invoke(made["args"]), tool_call_id=made["id"])
    final = llm.invoke([*history, answer, result])
    assert isinstance(final, AIMessage)


def test_litellm_tools_agent_turn(smollm2_server, smollm2_dir, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    import litellm

    params = dict(
        model=f"openai/{smollm2_dir.name}",
        api_base=smollm2_server.url + "/v1",
        api_key="x",
        tools=WEATHER_ONLY,
        temperature=0,
        max_tokens=40,
    )
    messages = [*FEW_SHOT, {"role": "user", "content": "What is the weather in Berlin?"}]
    answer = litellm.completion(messages=messages, **params).choices[0]
    (made,) = answer.message.tool_calls
    assert made.function.name == "get_weather"
    assert json.loads(made.function.arguments) == {"city": "Berlin"}
    assert answer.finish_reason == "tool_calls"
    result = {"role": "tool", "tool_call_id": made.id, "content": "18 C"}
    final = litellm.completion(messages=[*messages, answer.message, result], **params)
    assert final.choices[0].message.role == "assistant"


def test_required_streamed_reassembles_to_the_whole_response(oai, model_name):
    params = dict(
        model=model_name,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=True,
        max_tokens=96,
        temperature=0,
    )
    assert assert_stream_matches_whole(oai, params) == "tool_calls"


def test_tool_constraint_with_another_constraint_is_400(http, error_body):
    body = {
        "messages": USER,
        "tools": TOOLS,
        "tool_choice": "required",
        "response_format": {"type": "json_object"},
        "max_tokens": 1,
    }
    error = error_body(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "tool_choice"


def test_parameters_no_grammar_can_hold_to_are_400_naming_tools(http, error_body):
    bad = {"type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": bad}}]
    body = {"messages": USER, "tools": tools, "tool_choice": "required", "max_tokens": 1}
    error = error_body(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "tools"
