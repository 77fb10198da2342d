"""A request's structured-output fields as one engine constraint, checked at admission."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from packserve.engine import AsyncEngine
from packserve.scheduler import StructuredOutput

from .protocol import APIError, SamplingFields


def constraint_of(body: SamplingFields) -> tuple[StructuredOutput, str] | None:
    """The body's constraint and the field that set it; None without one. Two constraints
    in one request are a 400."""
    found: list[tuple[StructuredOutput, str]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append((StructuredOutput("json_object"), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema else None
        if schema is None:
            raise APIError(
                400,
                "response_format json_schema needs json_schema.schema",
                param="response_format.json_schema",
            )
        found.append((_json_schema(schema), "response_format.json_schema.schema"))
    extension = body.structured_outputs
    if extension is not None:
        if extension.json_ is not None:
            found.append((_json_schema(extension.json_), "structured_outputs.json"))
        if extension.regex is not None:
            found.append((StructuredOutput("regex", extension.regex), "structured_outputs.regex"))
        if extension.choice is not None:
            choice = StructuredOutput("choice", json.dumps(extension.choice))
            found.append((choice, "structured_outputs.choice"))
        if extension.grammar is not None:
            grammar = StructuredOutput("grammar", extension.grammar)
            found.append((grammar, "structured_outputs.grammar"))
        if extension.json_object:
            found.append((StructuredOutput("json_object"), "structured_outputs.json_object"))
    if body.guided_json is not None:
        found.append((_json_schema(body.guided_json), "guided_json"))
    if body.guided_regex is not None:
        found.append((StructuredOutput("regex", body.guided_regex), "guided_regex"))
    if body.guided_choice is not None:
        found.append((StructuredOutput("choice", json.dumps(body.guided_choice)), "guided_choice"))
    if body.guided_grammar is not None:
        found.append((StructuredOutput("grammar", body.guided_grammar), "guided_grammar"))
    if len(found) > 1:
        fields = ", ".join(param for _, param in found)
        raise APIError(
            400, f"at most one output constraint per request; got {fields}", param=found[1][1]
        )
    return found[0] if found else None


def _json_schema(schema: dict[str, Any] | str) -> StructuredOutput:
    """Schema text; key order kept (properties are generated in the schema's order)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return StructuredOutput("json_schema", text)


async def admit_constraint(engine: AsyncEngine, body: SamplingFields) -> StructuredOutput | None:
    """The body's constraint, compiled (off the event loop and the engine thread) so an invalid
    schema, regex or grammar is a 400 naming its field before anything is queued."""
    found = constraint_of(body)
    if found is None:
        return None
    return await compile_constraint(engine, *found)


async def compile_constraint(
    engine: AsyncEngine, constraint: StructuredOutput, param: str
) -> StructuredOutput:
    """`constraint`, compiled (a 400 naming `param`, the field that set it, if it cannot be)."""
    try:
        await asyncio.wrap_future(engine.compile_grammar(constraint))
    except ValueError as exc:
        raise APIError(400, f"invalid {param}: {exc}", param=param) from None
    return constraint
