"""The tool-call parser (packserve/engine/tools.py): whole responses, streamed deltas cut
anywhere, invalid bodies left as content, and the schemas and prompts around it."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packserve.engine.tools import (
    ToolCall,
    ToolCallParser,
    calls_of,
    detect_format,
    is_json_object,
    parse_tool_calls,
    render_calls,
    render_tool_result,
    required_calls,
    required_calls_schema,
    tools_prompt,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
TIME = '{"name": "get_time", "arguments": {}}'


def named(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def streamed(pieces: list[str]) -> tuple[str, list[ToolCall]]:
    parser = ToolCallParser()
    items = [i for p in pieces for i in parser.push(p)] + parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return content, [i for i in items if isinstance(i, ToolCall)]


# -- whole responses ------------------------------------------------------------------------


def test_plain_text_is_all_content():
    for text in ["", "hello", "  spaced  \n", "a < b and <tool but no call", "<tool_call"]:
        content, calls = parse_tool_calls(text)
        assert (content, calls) == (text, [])


def test_one_hermes_call():
    content, calls = parse_tool_calls(f"<tool_call>\n{WEATHER}\n</tool_call>")
    assert content == ""
    assert named(calls) == [("get_weather", {"city": "Paris", "unit": "c"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == len("call_") + 24


def test_several_hermes_calls_with_whitespace_between():
    text = f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n"
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2


def test_smollm2_array_of_calls():
    content, calls = parse_tool_calls(f"<tool_call>[{WEATHER}, {TIME}]</tool_call>")
    assert content == ""
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_smollm2_empty_array_is_no_call_and_no_content():
    content, calls = parse_tool_calls("<tool_call>[]</tool_call>")
    assert (content, calls) == ("", [])


def test_text_around_calls_is_content():
    text = f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\nDone, thanks."
    content, calls = parse_tool_calls(text)
    assert content == "Let me look.Done, thanks."
    assert [c.name for c in calls] == ["get_weather"]


def test_invalid_json_inside_a_tag_stays_content():
    for body in ['{"name": "f", "arguments": {', "not json", '{"arguments": {}}', "42", "[1, 2]"]:
        text = f"before <tool_call>{body}</tool_call> after"
        content, calls = parse_tool_calls(text)
        assert calls == []
        assert content == text


def test_an_invalid_tag_does_not_hide_a_valid_one():
    text = f"<tool_call>oops</tool_call><tool_call>{TIME}</tool_call>"
    content, calls = parse_tool_calls(text)
    assert content == "<tool_call>oops</tool_call>"
    assert [c.name for c in calls] == ["get_time"]


def test_unclosed_last_tag_is_parsed_if_its_json_is_complete():
    content, calls = parse_tool_calls(f"<tool_call>\n{WEATHER}\n")
    assert content == "" and [c.name for c in calls] == ["get_weather"]
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "argum')
    assert calls == [] and content == '<tool_call>\n{"name": "get_weather", "argum'


def test_arguments_as_string_or_absent():
    content, calls = parse_tool_calls(
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "g"}</tool_call>'
    )
    assert named(calls) == [("f", {"x": 1}), ("g", {})]
    assert calls_of('{"name": "f", "arguments": "[1]"}') is None
    assert calls_of('{"name": "", "arguments": {}}') is None
    assert calls_of('{"name": 3, "arguments": {}}') is None


def test_arguments_keep_unicode_and_are_a_json_object_string():
    (call,) = parse_tool_calls(
        '<tool_call>{"name": "f", "arguments": {"q": "café ☕"}}</tool_call>'
    )[1]
    assert call.arguments == '{"q": "café ☕"}'


def test_close_tag_without_open_is_content():
    assert parse_tool_calls("a </tool_call> b") == ("a </tool_call> b", [])


# -- streamed -------------------------------------------------------------------------------


def test_partial_open_tag_is_held_back_then_released():
    parser = ToolCallParser()
    assert parser.push("Hi <tool") == ["Hi"]  # the space waits: a call may follow
    assert parser.push("box>") == [" <toolbox>"]
    assert parser.finish() == []


def test_partial_tags_across_deltas_give_calls():
    pieces = ["Sure", ".", " <", "tool", "_ca", "ll>\n{\"name\": \"get_", 'time", "arg',
              'uments": {}}\n</tool', "_call", ">"]  # fmt: skip
    assert named(streamed(pieces)[1]) == [("get_time", {})]
    assert streamed(pieces)[0] == "Sure."


def test_call_is_released_at_its_closing_tag_not_before():
    parser = ToolCallParser()
    assert parser.push("<tool_call>\n" + WEATHER) == []
    (call,) = parser.push("\n</tool_call>")
    assert isinstance(call, ToolCall) and call.name == "get_weather"


def test_content_streams_before_a_call_arrives():
    parser = ToolCallParser()
    assert parser.push("The weather") == ["The weather"]
    assert parser.push(" is") == [" is"]


def test_trailing_whitespace_released_at_finish_without_calls():
    parser = ToolCallParser()
    assert parser.push("done\n\n") == ["done"]
    assert parser.finish() == ["\n\n"]


def test_partial_tag_at_the_end_is_content():
    parser = ToolCallParser()
    assert parser.push("x <tool_ca") == ["x"]
    assert parser.finish() == [" <tool_ca"]


TEXTS = [
    "",
    "plain answer, no calls",
    f"<tool_call>\n{WEATHER}\n</tool_call>",
    f"I'll check. <tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n",
    f"<tool_call>[{WEATHER}, {TIME}]</tool_call> and then some text\n",
    "<tool_call>{broken</tool_call> <tool_call>",
    f"a<tool_call>{TIME}</tool_call>b<tool_call>{TIME}",
    "<<tool_call>>" + TIME + "</tool_call></tool_call>",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEXTS), st.lists(st.integers(0, 200), max_size=12))
def test_any_cut_into_deltas_gives_the_whole_result(text, cuts):
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    content, calls = streamed(pieces)
    whole_content, whole_calls = parse_tool_calls(text)
    assert content == whole_content
    assert named(calls) == named(whole_calls)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='<>/_toolcal {}"n:ame[]x\n', max_size=60))
def test_nothing_is_invented_or_reordered(text):
    """Whatever the text, the content is what is left of it once calls (and whitespace next
    to them) are taken out: without calls all of it, with calls a subsequence of it."""
    content, calls = parse_tool_calls(text)
    if not calls:
        assert content == text
    rest = iter(text)
    assert all(ch in rest for ch in content)  # a subsequence, in order


# -- required / named -----------------------------------------------------------------------

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
TOOLS = {"get_weather": WEATHER_PARAMS, "get_time": {"type": "object", "properties": {}}}


def test_required_schema_accepts_calls_and_refuses_others():
    one = required_calls_schema(TOOLS, parallel=False)
    many = required_calls_schema(TOOLS, parallel=True)
    jsonschema.Draft202012Validator.check_schema(one)
    good = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    two = good + [{"name": "get_time", "arguments": {}}]
    jsonschema.validate(good, one)
    jsonschema.validate(two, many)
    for bad, schema in [
        ([], one),
        (two, one),
        ([{"name": "nope", "arguments": {}}], many),
        ([{"name": "get_weather", "arguments": {}}], many),  # city is required
        ([{"name": "get_time"}], many),
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_required_calls_from_json():
    calls = required_calls('[{"name": "get_time", "arguments": {}}]')
    assert calls is not None and named(calls) == [("get_time", {})]
    for bad in ["[]", "{}", "[{", '[{"name": "x", "arguments": 1}]']:
        assert required_calls(bad) is None


def test_is_json_object():
    assert is_json_object('{"a": 1}') and is_json_object(" {} ")
    assert not is_json_object('{"a": ') and not is_json_object("[1]")


# -- prompts --------------------------------------------------------------------------------


def test_rendered_calls_parse_back():
    calls = [("get_weather", {"city": "Paris"}), ("get_time", {})]
    for fmt in ("hermes", "smollm2"):
        content, parsed = parse_tool_calls(render_calls(calls, fmt))
        assert content == "" and named(parsed) == calls


def test_tools_prompt_lists_every_tool_and_the_format():
    tools = [
        {"type": "function", "function": {"name": n, "parameters": p}} for n, p in TOOLS.items()
    ]
    for fmt in ("hermes", "smollm2"):
        prompt = tools_prompt(tools, fmt)
        assert all(json.dumps(t) in prompt for t in tools)
        assert "<tool_call>" in prompt and "</tool_call>" in prompt
    assert "[{" in tools_prompt(tools, "smollm2") and "[{" not in tools_prompt(tools, "hermes")
    assert render_tool_result("12") == "<tool_response>\n12\n</tool_response>"


def test_detect_format():
    assert detect_format("... named SmolLM, trained by Hugging Face ...") == "smollm2"
    assert detect_format("{{ '<|im_start|>' }}<tool_call>") == "hermes"
    assert detect_format(None) == "hermes"
