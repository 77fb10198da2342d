"""Reasoning in generated text: the `<think>` ... `</think>` block that models which think
(Qwen3, DeepSeek-R1 style) write before their answer, split from the answer as the text arrives.

Only the first think block counts: the answer is everything after its closing tag (leading
whitespace dropped), and any later tags in it are content. Where the block opens is known from
the prompt: a chat template that ends the prompt inside an open `<think>` (Qwen3's, when it
thinks) means the output starts as reasoning; one that ends it with a closed block (Qwen3 with
thinking off) means there is none. Otherwise the output is reasoning if it opens with
`<think>`, and, for a model whose template opened the block without it showing in the prompt,
everything before a `</think>` without an opening tag is reasoning too. Pure Python.
"""

from __future__ import annotations

from typing import Literal

ReasoningParserName = Literal["none", "qwen3"]
OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

# Where the output starts: "reasoning" (inside the block), "content" (after it), "start" (not
# known yet: waiting for an opening tag), "unopened" (no opening tag: waiting for a closing one).
State = Literal["start", "unopened", "reasoning", "content"]


def prompt_state(prompt_text: str) -> State:
    """Where output after this prompt text starts: inside the think block the prompt opened,
    after the one it closed at its end, or not known ("start")."""
    opened, closed = prompt_text.rfind(OPEN_TAG), prompt_text.rfind(CLOSE_TAG)
    if opened > closed:
        return "reasoning"
    if closed >= 0 and prompt_text.rstrip().endswith(CLOSE_TAG):
        return "content"
    return "start"


class ReasoningParser:
    """Splits generated text into reasoning and content as the text arrives.

    `push` takes a text delta and returns the `(reasoning, content)` text now known (either
    may be empty; reasoning always comes first, as the block precedes the answer). Text that
    may be the start of a tag is held back until it is known not to be; with no opening tag
    the text is held until a closing tag or the end decides what it is. `finish` releases what
    is left: an unclosed block is all reasoning, text with no block all content, verbatim.

    The result does not depend on how the text was cut into deltas: streamed and whole
    responses agree.
    """

    def __init__(self, state: State = "start") -> None:
        self.state: State = state
        self._buffer = ""  # text received but not yet released
        self._answer_started = state == "content"  # leading whitespace of the answer is dropped

    def push(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning = content = ""
        if self.state == "start":
            head = self._buffer.lstrip()
            if head.startswith(OPEN_TAG):
                self._buffer = head[len(OPEN_TAG) :]
                self.state = "reasoning"
            elif not OPEN_TAG.startswith(head):  # not (the start of) an opening tag
                self.state = "unopened"
        if self.state in ("reasoning", "unopened"):
            at = self._buffer.find(CLOSE_TAG)
            if at >= 0:
                reasoning = self._buffer[:at]
                self._buffer = self._buffer[at + len(CLOSE_TAG) :]
                self.state = "content"
            elif self.state == "reasoning":
                cut = len(self._buffer) - _partial_suffix(self._buffer, CLOSE_TAG)
                reasoning, self._buffer = self._buffer[:cut], self._buffer[cut:]
        if self.state == "content":
            content = self._answer(self._buffer)
            self._buffer = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self._buffer = self._buffer, ""
        if self.state == "reasoning":
            return rest, ""
        if self.state == "content":
            return "", self._answer(rest)
        return "", rest  # no think block: the text as written

    def _answer(self, text: str) -> str:
        if not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that begins `tag` (but is not all of it)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_reasoning(text: str, state: State = "start") -> tuple[str, str]:
    """A whole response's reasoning and content."""
    parser = ReasoningParser(state)
    reasoning, content = parser.push(text)
    rest = parser.finish()
    return reasoning + rest[0], content + rest[1]
