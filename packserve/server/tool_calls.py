"""Tool calling in chat completions: what a request's tool_choice means (which tools reach the
prompt, what is parsed, what a grammar enforces), the messages as the chat template gets them,
and each choice's output as OpenAI's `tool_calls`, whole or as stream deltas."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from packserve.engine import AsyncEngine
from packserve.engine.reasoning import ReasoningParser, State
from packserve.engine.tools import (
    ToolCall,
    ToolCallParser,
    ToolFormatName,
    detect_format,
    is_json_object,
    new_call_id,
    render_calls,
    render_tool_result,
    required_calls,
    required_calls_schema,
    tools_prompt,
)
from packserve.scheduler import StructuredOutput

from .protocol import APIError, AssistantMessage, ChatCompletionRequest, ChatMessage, ToolMessage
from .structured import compile_constraint
from .tool_protocol import Tool

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools and tool_choice ask for.

    none: no tools in the prompt, nothing parsed (the model cannot call what it is not shown,
    so "will not call a tool" holds). auto: tools in the prompt, calls parsed from the text.
    required / named: tools in the prompt and a grammar holding the output to the calls'
    JSON (vLLM's way): named, the function's arguments object; required, an array of
    `{"name", "arguments"}` calls (one unless parallel_tool_calls)."""

    mode: Mode
    tools: tuple[Tool, ...] = ()  # the tools the prompt shows
    named: str | None = None  # the function a named choice calls
    parallel: bool = True

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolPlan:
        """The plan of a request; a 400 naming the field for a choice that cannot be met."""
        tools = tuple(body.tools or ())
        names = [t.function.name for t in tools]
        if len(set(names)) < len(names):
            raise APIError(400, "tools must have different function names", param="tools")
        choice = body.tool_choice or "auto"
        if choice == "none" or (choice == "auto" and not tools):
            return cls("none")
        if not tools:
            raise APIError(400, "tool_choice needs tools to choose from", param="tool_choice")
        if choice == "auto" or choice == "required":
            return cls(choice, tools, parallel=body.parallel_tool_calls)
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                param="tool_choice.function.name",
            )
        return cls("named", tools, choice.function.name, body.parallel_tool_calls)

    @property
    def structured(self) -> StructuredOutput | None:
        """The grammar that enforces a required or named choice."""
        schemas = {t.function.name: t.function.schema_ for t in self.tools}
        if self.mode == "named":
            assert self.named is not None
            return StructuredOutput("json_schema", json.dumps(schemas[self.named]))
        if self.mode == "required":
            schema = required_calls_schema(schemas, self.parallel)
            return StructuredOutput("json_schema", json.dumps(schema))
        return None

    async def admit_constraint(
        self, engine: AsyncEngine, other: StructuredOutput | None
    ) -> StructuredOutput | None:
        """The request's output constraint: the tools' (compiled: a tool's parameters that
        no grammar can hold to are a 400 naming tools) or `other`, the one its structured
        output fields set; both at once are a 400."""
        own = self.structured
        if own is None:
            return other
        if other is not None:
            raise APIError(
                400,
                "tool_choice required or a named function cannot be combined with another "
                "output constraint (response_format, structured_outputs, guided_*)",
                param="tool_choice",
            )
        return await compile_constraint(engine, own, "tools")

    def reader(self, reasoning: State | None = None) -> ToolReader:
        """A reader of one choice's output; `reasoning`: split a think block off first,
        the output starting in that state (None: no reasoning parser)."""
        return ToolReader(self, None if reasoning is None else ReasoningParser(reasoning))


# -- output ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arguments:
    """More of the arguments of the call opened last (a named choice streams them)."""

    text: str


@dataclass(frozen=True, slots=True)
class Reasoning:
    """Text of the think block (before the content and any calls)."""

    text: str


Item = str | ToolCall | Arguments | Reasoning  # content, a call (its arguments so far), more


@dataclass(slots=True)
class ToolReader:
    """One choice's output read as its plan says: text deltas in, items out (reasoning,
    content, calls, argument pieces), in order; whole responses run the same reader over the
    whole text. With a reasoning parser, calls are read from the content only."""

    plan: ToolPlan
    reasoning: ReasoningParser | None = None
    num_calls: int = 0
    complete: bool = True  # the calls made are whole (a named call's JSON may be cut off)
    _parser: ToolCallParser = field(default_factory=ToolCallParser)
    _text: list[str] = field(default_factory=list)  # a required choice's output, held
    _opened: int = 0  # calls turned into stream deltas

    def push(self, text: str) -> list[Item]:
        if self.reasoning is None:
            return self._push(text)
        thought, text = self.reasoning.push(text)
        return _thought(thought) + self._push(text)

    def finish(self) -> list[Item]:
        if self.reasoning is None:
            return self._finish()
        thought, text = self.reasoning.finish()
        return _thought(thought) + self._push(text) + self._finish()

    def _push(self, text: str) -> list[Item]:
        mode = self.plan.mode
        if mode == "none":
            return [text] if text else []
        if mode == "auto":
            return self._counted(self._parser.push(text))
        self._text.append(text)
        if mode == "required" or not text:
            return []
        if self.num_calls:  # named, the call already open
            return [Arguments(text)]
        assert self.plan.named is not None
        return self._counted([ToolCall(new_call_id(), self.plan.named, ""), Arguments(text)])

    def _finish(self) -> list[Item]:
        mode = self.plan.mode
        if mode == "none":
            return []
        if mode == "auto":
            return self._counted(self._parser.finish())
        text = "".join(self._text)
        if mode == "named":
            self.complete = is_json_object(text)
            if self.num_calls:
                return []
            assert self.plan.named is not None
            return self._counted([ToolCall(new_call_id(), self.plan.named, text)])
        calls = required_calls(text)
        return [text] if calls is None else self._counted(list(calls))

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the model stopped after making whole calls."""
        if reason == "stop" and self.num_calls and self.complete:
            return "tool_calls"
        return reason

    def _counted(self, items: Sequence[Item]) -> list[Item]:
        self.num_calls += sum(isinstance(i, ToolCall) for i in items)
        return list(items)

    def deltas(self, items: list[Item]) -> list[dict[str, Any]]:
        """Items as chat-chunk `delta` objects: content, or one `tool_calls` entry: a call's
        first (index, id, type, name, empty arguments), then pieces of its arguments."""
        out: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, str):
                out.append({"content": item})
                continue
            if isinstance(item, Reasoning):
                out.append({"reasoning_content": item.text})
                continue
            if isinstance(item, ToolCall):
                self._opened += 1
                function = {"name": item.name, "arguments": ""}
                opening = {"index": self._opened - 1, "id": item.id, "type": "function"}
                out.append({"tool_calls": [{**opening, "function": function}]})
            piece = item.arguments if isinstance(item, ToolCall) else item.text
            if piece:
                arguments = {"index": self._opened - 1, "function": {"arguments": piece}}
                out.append({"tool_calls": [arguments]})
        return out

    def message(self, text: str) -> dict[str, Any]:
        """The assistant message of a whole response (a fresh reader over all its text)."""
        items = self.push(text) + self.finish()
        calls: list[dict[str, Any]] = []
        content = []
        thoughts = []
        for item in items:
            if isinstance(item, str):
                content.append(item)
            elif isinstance(item, Reasoning):
                thoughts.append(item.text)
            elif isinstance(item, ToolCall):
                function = {"name": item.name, "arguments": item.arguments}
                calls.append({"id": item.id, "type": "function", "function": function})
            else:
                calls[-1]["function"]["arguments"] += item.text
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if self.reasoning is not None:
            message["reasoning_content"] = "".join(thoughts) or None
        if calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = calls
        return message


def _thought(text: str) -> list[Item]:
    return [Reasoning(text)] if text else []


# -- input: the messages the chat template gets ---------------------------------------------


def tool_format(setting: str, chat_template: str | None) -> ToolFormatName:
    """The `--tool-call-parser` setting resolved: "auto" picks by the chat template."""
    if setting == "auto":
        return detect_format(chat_template)
    assert setting in ("hermes", "smollm2")
    return setting  # type: ignore[return-value]


@lru_cache(maxsize=8)
def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template shows a request's tools to the model (Qwen's, Llama 3.1's
    do; SmolLM2's and the tiny model's ignore them)."""
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "probe_tool_9", "parameters": {}}}
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False)
        without = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that fails on tools does not render them
        return False
    return bool(with_tools != without)


def conversation(
    messages: Sequence[ChatMessage], tools: Sequence[Tool], fmt: ToolFormatName, native: bool
) -> list[dict[str, Any]]:
    """The messages as the chat template gets them. A template that renders tools (`native`)
    gets OpenAI's history as transformers expects it (calls' arguments as objects); for one
    that does not, tools become a system prompt section in `fmt`, earlier calls become the
    assistant's text, and tool results user turns in <tool_response> tags."""
    made = [c for m in messages if isinstance(m, AssistantMessage) for c in m.tool_calls or ()]
    names = {c.id: c.function.name for c in made}
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        turn: dict[str, Any] = {"role": role, "content": m.text()}
        called = m.tool_calls or [] if isinstance(m, AssistantMessage) else []
        calls = [(c.function.name, _arguments(c.function.arguments)) for c in called]
        if native:
            if called:
                turn["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": n, "arguments": a}}
                    for c, (n, a) in zip(called, calls, strict=True)
                ]
            if isinstance(m, ToolMessage):
                turn.update(tool_call_id=m.tool_call_id, name=names.get(m.tool_call_id, ""))
        elif calls:
            turn["content"] = "\n".join(filter(None, [turn["content"], render_calls(calls, fmt)]))
        elif role == "tool":
            result = render_tool_result(turn["content"])
            if out and out[-1].get("tool_results"):  # results of one turn's calls: one user turn
                out[-1]["content"] += "\n" + result
                continue
            turn = {"role": "user", "content": result, "tool_results": True}
        out.append(turn)
    for turn in out:
        turn.pop("tool_results", None)
    if tools and not native:
        section = tools_prompt([t.model_dump(exclude_none=True) for t in tools], fmt)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{section}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _arguments(text: str) -> Any:
    """A call's arguments as an object for the template; text that is not JSON stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text
