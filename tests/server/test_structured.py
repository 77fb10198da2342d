"""Structured output through a real server and the official client: response_format
(json_schema via the SDK's `parse`, json_object), vLLM's regex / choice / grammar extension,
streamed and n > 1, and bad constraints refused with a 400 naming the field.

The tiny model's weights are random: whatever it emits is valid only because the grammar
constrains it, so every check here is a check of the constraint."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(max_length=12)]
    kind: Literal["cat", "dog", "fish"]
    age: Annotated[int, Field(ge=0, le=30)]
    vaccinated: bool
    toys: Annotated[list[Literal["ball", "rope"]], Field(max_length=3)]


PET_SCHEMA = Pet.model_json_schema()


def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}


def test_parse_returns_the_pydantic_object(oai, model_name):
    r = oai.beta.chat.completions.parse(
        model=model_name, messages=MESSAGES, response_format=Pet, max_tokens=200, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)
    assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_sampled_json_schema_validates_with_n_2(oai, model_name):
    r = oai.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        response_format=_json_schema_format(PET_SCHEMA),
        max_tokens=200,
        temperature=1.0,
        seed=7,
        n=2,
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PET_SCHEMA)


def test_streamed_json_schema_validates(oai, model_name):
    stream = oai.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        response_format=_json_schema_format(PET_SCHEMA),
        max_tokens=200,
        temperature=1.0,
        seed=3,
        n=2,
        stream=True,
    )
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert reasons == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), PET_SCHEMA)


def test_regex_choice_and_grammar_extension(oai, model_name):
    pattern = r"[a-z]{2,6}-[0-9]{3}"
    r = oai.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        max_tokens=50,
        temperature=1.0,
        extra_body={"structured_outputs": {"regex": pattern}},
    )
    assert re.fullmatch(pattern, r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"
    choices = ["yes", "no", "not sure"]
    r = oai.completions.create(
        model=model_name,
        prompt="Is it?",
        max_tokens=20,
        temperature=1.0,
        n=3,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in r.choices)
    grammar = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'
    r = oai.completions.create(
        model=model_name,
        prompt="Sum:",
        max_tokens=60,
        temperature=1.0,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", r.choices[0].text)
    # vLLM's older field name
    r = oai.completions.create(
        model=model_name,
        prompt="Is it?",
        max_tokens=20,
        extra_body={"guided_choice": choices},
    )
    assert r.choices[0].text in choices


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"response_format": _json_schema_format({"type": "object", "required": 5})},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        (
            {"structured_outputs": {"grammar": "start: undefined_rule"}},
            "structured_outputs.grammar",
        ),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs.regex",
        ),
    ],
)
def test_invalid_constraint_is_a_400_naming_the_field(http, model_name, error_body, body, param):
    r = http.post(
        "/v1/chat/completions",
        json={"model": model_name, "messages": MESSAGES, "max_tokens": 5, **body},
    )
    error = error_body(r, 400, "invalid_request_error")
    assert error["param"] == param, error


def test_openai_sdk_rejects_bad_schema_as_bad_request(oai, model_name):
    import openai

    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model=model_name,
            messages=MESSAGES,
            max_tokens=5,
            response_format=_json_schema_format({"type": "nonsense"}),
        )


def test_json_object_is_parseable_json(smollm2_server):
    import openai

    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {"role": "user", "content": 'Give me a JSON object with a key "name" set to "Bob".'}
        ],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
