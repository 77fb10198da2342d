"""Incremental detokenization and stop strings: token ids in, safe text deltas out."""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase


def decode(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], skip_special_tokens: bool = False
) -> str:
    """Token ids to text (the tokenizer's own decode, typed for one sequence)."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


class TextStream:
    """Turns a request's generated tokens into text deltas.

    A delta never ends inside a multi-byte character (the decoder's replacement character
    marks an incomplete one), and text that could be the start of a stop string is held back
    until it is known not to be one, so a stop string never leaks into the stream.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = (), min_tokens: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens  # stop strings are looked for from this many tokens on
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids before this are decoded and emitted for good
        self._read_offset = 0  # ids before this have produced text
        self._pending = ""  # decoded text held back for a possible stop string
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found; nothing more is emitted

    def push(self, token_ids: tuple[int, ...] | list[int]) -> str:
        """Add generated tokens; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(after[len(before) :])

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids, skip_special_tokens=True)

    def finish(self) -> str:
        """The request ended: release any text held back for a stop string."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        self.text += out
        return out

    def _release(self, new_text: str) -> str:
        pending = self._pending + new_text
        if self.stop and len(self._ids) >= self.min_tokens:
            hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self._pending = ""
                out = pending[: min(hits)]
                self.text += out
                return out
        hold = self._held_back(pending)
        out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        for n in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
