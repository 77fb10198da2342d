"""Tool calls in generated text: the formats models write them in, the parser that finds them
in a whole response or in a stream of text deltas, and the prompt text that teaches a format
to a model whose chat template does not render tools.

Both formats wrap calls in `<tool_call>` ... `</tool_call>`; they differ in what goes inside:
Hermes (Qwen2.5, Qwen3) writes one JSON object `{"name": ..., "arguments": {...}}` per tag,
SmolLM2 writes a JSON array of them in one tag. The parser accepts either inside any tag, so
a model that mixes them still has its calls found. A tag whose body is not such JSON is left
in the content, tag and all. Pure Python: no torch, no tokenizer.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

ToolFormatName = Literal["hermes", "smollm2"]
OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call a model made."""

    id: str  # call_<24 hex digits>, as the tool message's tool_call_id refers back to it
    name: str
    arguments: str  # the JSON object's text, as OpenAI's `function.arguments`


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def call_of(item: Any) -> ToolCall | None:
    """A call from parsed JSON `{"name": str, "arguments": object}` (arguments may be absent,
    meaning none, or a string holding a JSON object); None if it is not one."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False))


def calls_of(body: str) -> list[ToolCall] | None:
    """The calls in one tag's body: a call object or an array of them (possibly empty); None
    when the body is anything else."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call_of(item) for item in items]
    return None if None in calls else [c for c in calls if c is not None]


# -- parsing --------------------------------------------------------------------------------

Item = str | ToolCall  # content text, or a complete call


class ToolCallParser:
    """Splits generated text into content and tool calls as the text arrives.

    `push` takes a text delta and returns what is now known: content pieces and complete
    calls, in order. Text that may be the start of `<tool_call>` is held back until it is
    known not to be; a call's body is held until its closing tag, then released as calls
    (valid JSON) or as content (anything else). Whitespace next to a call is dropped, so a
    response that is only calls has no content. `finish` releases what is left: an unclosed
    last tag is parsed as if closed (a model may stop right after the JSON).

    The result does not depend on how the text was cut into deltas: streamed and whole
    responses agree.
    """

    def __init__(self) -> None:
        self._buffer = ""  # text received but not yet released
        self._in_call = False  # the buffer is the body of an open tag
        self._space = ""  # whitespace after content, dropped if a call follows
        self._after_call = False  # the last thing released was a call
        self.num_calls = 0

    def push(self, text: str) -> list[Item]:
        self._buffer += text
        out: list[Item] = []
        while True:
            tag = CLOSE_TAG if self._in_call else OPEN_TAG
            at = self._buffer.find(tag)
            if at < 0:
                break
            piece, self._buffer = self._buffer[:at], self._buffer[at + len(tag) :]
            if self._in_call:
                self._release_call(piece, closed=True, out=out)
            else:
                self._release_text(piece, out)
            self._in_call = not self._in_call
        if not self._in_call:
            cut = len(self._buffer) - _partial_tag(self._buffer)
            piece, self._buffer = self._buffer[:cut], self._buffer[cut:]
            self._release_text(piece, out)
        return out

    def finish(self) -> list[Item]:
        out: list[Item] = []
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            self._release_call(rest, closed=False, out=out)
        else:
            self._release_text(rest, out)
        if self._space and not self.num_calls:
            out.append(self._space)
        self._space = ""
        return out

    def _release_call(self, body: str, closed: bool, out: list[Item]) -> None:
        calls = calls_of(body)
        if calls is None:  # not a call after all: the tag and its body are content
            self._release_text(OPEN_TAG + body + (CLOSE_TAG if closed else ""), out)
            return
        self._space = ""
        self._after_call = True
        self.num_calls += len(calls)
        out.extend(calls)

    def _release_text(self, text: str, out: list[Item]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        if body:
            out.append(body)


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that begins OPEN_TAG (but is not all of it)."""
    for n in range(min(len(text), len(OPEN_TAG) - 1), 0, -1):
        if OPEN_TAG.startswith(text[-n:]):
            return n
    return 0


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole response's content (the text outside the calls) and its calls."""
    parser = ToolCallParser()
    items = parser.push(text) + parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return content, [i for i in items if isinstance(i, ToolCall)]


# -- enforced calls: the JSON a grammar holds the model to ----------------------------------


def required_calls_schema(tools: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of `tool_choice: "required"`: an array of one call (several with
    parallel calls) of the tools `name -> parameters schema`."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"enum": [name]}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, schema in tools.items()
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def required_calls(text: str) -> list[ToolCall] | None:
    """The calls of a `required` response (a JSON array of calls); None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not value:
        return None
    calls = [call_of(item) for item in value]
    return None if None in calls else [c for c in calls if c is not None]


def is_json_object(text: str) -> bool:
    """Whether `text` is a JSON object: a named call's arguments, complete."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# -- prompts for templates that do not render tools -----------------------------------------


def tools_prompt(tools: list[dict[str, Any]], fmt: ToolFormatName) -> str:
    """A system prompt section listing `tools` (OpenAI's `{"type": "function", "function":
    {...}}` objects) and saying how to call them in format `fmt`."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if fmt == "hermes":
        how = (
            "To call a function, write a JSON object with its name and arguments between "
            f"{OPEN_TAG} and {CLOSE_TAG} tags, one call per pair of tags:\n"
            f'{OPEN_TAG}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{CLOSE_TAG}'
        )
    else:
        how = (
            "To call functions, write a JSON list of calls, each with the function's name "
            f"and arguments, between {OPEN_TAG} and {CLOSE_TAG} tags:\n"
            f'{OPEN_TAG}[{{"name": "<function name>", "arguments": {{<arguments>}}}}]{CLOSE_TAG}'
        )
    return (
        "You can call functions to answer the user. They are listed here, one JSON object "
        f"per line, between <tools></tools> tags:\n<tools>\n{listed}\n</tools>\n\n{how}"
    )


def render_calls(calls: list[tuple[str, Any]], fmt: ToolFormatName) -> str:
    """Earlier calls `(name, arguments object)` as the model would have written them."""
    objects = [{"name": name, "arguments": arguments} for name, arguments in calls]
    if fmt == "hermes":
        return "\n".join(
            f"{OPEN_TAG}\n{json.dumps(o, ensure_ascii=False)}\n{CLOSE_TAG}" for o in objects
        )
    return f"{OPEN_TAG}{json.dumps(objects, ensure_ascii=False)}{CLOSE_TAG}"


def render_tool_result(content: str) -> str:
    """A tool's result as a user turn carries it (both formats' convention)."""
    return f"<tool_response>\n{content}\n</tool_response>"


def detect_format(chat_template: str | None) -> ToolFormatName:
    """The format a model writes calls in, from its chat template: SmolLM2's, or Hermes
    (the Qwen families and most templates that render tools)."""
    return "smollm2" if chat_template and "SmolLM" in chat_template else "hermes"
