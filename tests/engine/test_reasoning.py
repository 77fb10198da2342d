"""The reasoning parser: whole responses, every edge of the think block, and streams cut
anywhere giving what the whole text gives."""

from __future__ import annotations

import random

import pytest

from packserve.engine.reasoning import ReasoningParser, State, parse_reasoning, prompt_state


@pytest.mark.parametrize(
    ("text", "state", "reasoning", "content"),
    [
        # no think block at all: all content, verbatim
        ("hello there", "start", "", "hello there"),
        ("  hello\n", "start", "", "  hello\n"),
        ("", "start", "", ""),
        ("<thin", "start", "", "<thin"),  # a partial tag that never completes
        ("<b>bold</b>", "start", "", "<b>bold</b>"),
        # an opening tag first (after whitespace): reasoning, then the answer
        ("<think>plan</think>answer", "start", "plan", "answer"),
        ("\n<think>\nplan\n</think>\n\nanswer", "start", "\nplan\n", "answer"),
        ("<think></think>answer", "start", "", "answer"),
        ("<think>plan</think>", "start", "plan", ""),
        ("<think>plan</think>  \n ", "start", "plan", ""),
        # unclosed at the end: all reasoning
        ("<think>still thinking", "start", "still thinking", ""),
        ("<think>still </thin", "start", "still </thin", ""),
        ("<think>", "start", "", ""),
        # a closing tag without an opening one (the template opened it): reasoning before it
        ("plan</think>answer", "start", "plan", "answer"),
        ("plan\n</think>\n\nanswer", "start", "plan\n", "answer"),
        ("</think>answer", "start", "", "answer"),
        # only the first block counts: later tags are content
        ("<think>a</think>b<think>c</think>d", "start", "a", "b<think>c</think>d"),
        ("<think>a<think>b</think>c", "start", "a<think>b", "c"),
        ("<think>a</think>b</think>c", "start", "a", "b</think>c"),
        # an opening tag after other text is not a block's start
        ("hi <think>x", "start", "", "hi <think>x"),
        ("hi <think>x</think>y", "start", "hi <think>x", "y"),
        # the prompt opened the block: the output starts as reasoning
        ("plan</think>answer", "reasoning", "plan", "answer"),
        ("still thinking", "reasoning", "still thinking", ""),
        ("<think>x</think>y", "reasoning", "<think>x", "y"),
        # the prompt closed the block: all content, tags and all
        ("answer", "content", "", "answer"),
        ("<think>x</think>y", "content", "", "<think>x</think>y"),
    ],
)
def test_whole(text: str, state: State, reasoning: str, content: str) -> None:
    assert parse_reasoning(text, state) == (reasoning, content)


@pytest.mark.parametrize(
    ("prompt", "state"),
    [
        ("<|im_start|>assistant\n", "start"),
        ("<|im_start|>assistant\n<think>\n", "reasoning"),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "content"),
        # an earlier turn's closed block does not decide the new one
        ("<think>a</think>b<|im_end|>\n<|im_start|>assistant\n", "start"),
        ("<think>a</think>b<|im_end|>\n<|im_start|>assistant\n<think>", "reasoning"),
    ],
)
def test_prompt_state(prompt: str, state: State) -> None:
    assert prompt_state(prompt) == state


def _streamed(text: str, cuts: list[int], state: State) -> tuple[str, str]:
    parser = ReasoningParser(state)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out = [parser.push(p) for p in pieces] + [parser.finish()]
    for (_, content), (later, _) in zip(out, out[1:], strict=False):
        assert not (content and later), "reasoning after content"
    return "".join(r for r, _ in out), "".join(c for _, c in out)


TEXTS = [
    "<think>plan</think>answer",
    "\n <think>\nI should add.\n</think>\n\nThe sum is 4.",
    "plan</think>answer",
    "no block here at all </thin",
    "<think>unclosed </th",
    "<think></think></think><think>",
    "  <thi nk>",
    "<<think>>",
    "<think>a</think>  b <think>c</think>",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("state", ["start", "reasoning", "content"])
def test_every_single_cut_matches_whole(text: str, state: State) -> None:
    whole = parse_reasoning(text, state)
    for cut in range(len(text) + 1):
        assert _streamed(text, [cut], state) == whole
    assert _streamed(text, list(range(1, len(text))), state) == whole  # a character at a time


def test_random_texts_random_cuts_match_whole() -> None:
    rng = random.Random(15)
    atoms = ["<think>", "</think>", "<", "/", "think", ">", "a", "b c", " ", "\n", "<thi", "nk>"]
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        state: State = rng.choice(["start", "reasoning", "content"])
        inner = range(1, len(text))
        cuts = sorted(rng.sample(inner, min(len(inner), rng.randint(0, 6))))
        assert _streamed(text, cuts, state) == parse_reasoning(text, state), (text, cuts, state)


def test_tags_split_across_deltas_are_held_back() -> None:
    parser = ReasoningParser()
    assert parser.push("<thi") == ("", "")
    assert parser.push("nk>plan</th") == ("plan", "")
    assert parser.push("ink>\n") == ("", "")
    assert parser.push("answer") == ("", "answer")
    assert parser.finish() == ("", "")


def test_reasoning_streams_before_the_block_closes() -> None:
    parser = ReasoningParser()
    assert parser.push("<think>one ") == ("one ", "")
    assert parser.push("two") == ("two", "")
    assert parser.finish() == ("", "")
