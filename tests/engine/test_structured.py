"""Structured output in the engine, offline on the tiny model (random weights: valid output
comes from the grammar alone): random schemas all validate, a grammar never leaks into its
neighbours' logits, preemption does not advance a matcher twice."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest

from packserve.engine.engine import Engine
from packserve.engine.structured import GrammarCompiler, GrammarState
from packserve.scheduler import SamplingParams, ScheduledSequence, StructuredOutput


def run(engine: Engine, work: list[tuple[str, SamplingParams]]) -> list[tuple[list[int], str]]:
    """Add every (prompt, params), step to the end: (token ids, finish reason) in order."""
    ids = [engine.add_request(prompt, params) for prompt, params in work]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    reasons: dict[str, str] = {}
    while engine.has_unfinished:
        for delta in engine.step():
            tokens[delta.request_id] += delta.token_ids
            if delta.finish_reason is not None:
                reasons[delta.request_id] = delta.finish_reason
    return [(tokens[i], reasons[i]) for i in ids]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object of 1..4 bounded fields: strings, integers, booleans, enums, arrays, and
    (once) a nested object."""

    def field() -> dict[str, Any]:
        kinds = ["string", "integer", "boolean", "enum", "array"] + (
            ["object"] if not depth else []
        )
        kind = rng.choice(kinds)
        if kind == "string":
            return {
                "type": "string",
                "minLength": rng.randint(0, 2),
                "maxLength": rng.randint(3, 8),
            }
        if kind == "integer":
            low = rng.randint(-50, 50)
            return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
        if kind == "boolean":
            return {"type": "boolean"}
        if kind == "enum":
            return {"enum": rng.sample(["red", "green", "blue", "a b", 'x"y', "zz"], 3)}
        if kind == "array":
            item = rng.choice(
                [
                    {"type": "boolean"},
                    {"enum": ["p", "q"]},
                    {"type": "integer", "minimum": 0, "maximum": 9},
                ]
            )
            return {"type": "array", "items": item, "minItems": 0, "maxItems": rng.randint(1, 3)}
        return random_schema(rng, depth + 1)

    names = rng.sample(
        ["id", "name", "ok", "tags", "kind", "size", "meta", "note"], rng.randint(1, 4)
    )
    return {
        "type": "object",
        "properties": {n: field() for n in names},
        "required": names,
        "additionalProperties": False,
    }


def test_200_random_schemas_all_validate(make_engine):
    engine = make_engine(max_model_len=512)
    rng = random.Random(15)
    schemas = [random_schema(rng) for _ in range(200)]
    work = [
        (
            f"Item {i}:",
            SamplingParams(
                max_tokens=300,
                temperature=1.0,
                seed=i,
                structured=StructuredOutput("json_schema", json.dumps(schema)),
            ),
        )
        for i, schema in enumerate(schemas)
    ]
    for (tokens, reason), schema in zip(run(engine, work), schemas, strict=True):
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        assert reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


PROMPTS = ["The weather today", "Once upon a time there was", "1, 2, 3,"]
CONSTRAINTS = [
    StructuredOutput("regex", r"[a-z]{1,5}( [a-z]{1,5}){2,4}\."),
    StructuredOutput("json_schema", json.dumps(random_schema(random.Random(1)))),
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_does_not_leak_into_neighbours(make_engine, temperature):
    engine = make_engine(batch_invariant=True, max_model_len=512)
    plain = SamplingParams(max_tokens=24, temperature=temperature, seed=4, ignore_eos=True)
    constrained = [
        SamplingParams(max_tokens=100, temperature=temperature, seed=9, structured=c)
        for c in CONSTRAINTS
    ]
    alone = [run(engine, [(p, plain)])[0] for p in PROMPTS]
    constrained_alone = [run(engine, [("Answer:", params)])[0] for params in constrained]
    batch = [(p, plain) for p in PROMPTS] + [("Answer:", params) for params in constrained]
    together = run(engine, batch)
    assert together[: len(PROMPTS)] == alone
    assert together[len(PROMPTS) :] == constrained_alone
    regex_text = engine.tokenizer.decode(together[len(PROMPTS)][0], skip_special_tokens=True)
    assert re.fullmatch(CONSTRAINTS[0].spec, regex_text)


def test_preempted_constrained_requests_replay_without_double_advancing(make_engine):
    rng = random.Random(7)
    schema = {
        "type": "object",
        "properties": {
            "words": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 6,
                "maxItems": 6,
            }
        },
        "required": ["words"],
        "additionalProperties": False,
    }
    params = SamplingParams(
        max_tokens=120,
        temperature=1.0,
        seed=3,
        structured=StructuredOutput("json_schema", json.dumps(schema)),
    )
    prompts = [
        " ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(30)) for _ in range(8)
    ]

    def generate(**overrides: object) -> tuple[list[tuple[list[int], str]], Engine]:
        engine = make_engine(batch_invariant=True, max_model_len=192, **overrides)
        return run(engine, [(p, params) for p in prompts]), engine

    roomy, _ = generate()
    cramped, engine = generate(num_kv_blocks=24)  # 192 slots for 8 sequences of ~100
    assert engine.scheduler.num_preemptions_total > 0
    assert cramped == roomy
    for tokens, reason in cramped:
        assert reason == "stop"
        jsonschema.validate(
            json.loads(engine.tokenizer.decode(tokens, skip_special_tokens=True)), schema
        )


def test_bad_constraint_is_refused_on_add(make_engine):
    engine = make_engine()
    bad = SamplingParams(structured=StructuredOutput("regex", "(unclosed"))
    engine.compile_grammar(bad.structured).exception(timeout=30)  # compiled: refused on add
    with pytest.raises(ValueError):
        engine.add_request("x", bad)
    assert not engine.has_unfinished


def test_model_padding_ids_are_never_allowed(offline_engine):
    # A model's logits can be wider than its tokenizer (padded embeddings): the extra ids are
    # masked whatever the grammar allows.
    tokenizer = offline_engine.tokenizer
    num_real = len(tokenizer)
    padded = num_real + 40
    compiler = GrammarCompiler(tokenizer, padded, [tokenizer.eos_token_id])
    start = compiler.compile(StructuredOutput("regex", ".{0,20}")).result(timeout=60)
    state = GrammarState(padded, num_real)
    state.add("r", start)
    seq = ScheduledSequence("r", (1,), 0, (), is_decode=False, sample=True)
    (allowed,) = state.masks([seq]).values()
    assert allowed.shape == (padded,)
    assert allowed[:num_real].any()
    assert not allowed[num_real:].any()
    compiler.shutdown()
