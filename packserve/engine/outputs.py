"""A request's output as it grows: one Delta per step, accumulated into one Completion."""

from __future__ import annotations

from dataclasses import dataclass, field

from packserve.scheduler import TokenLogprobs


@dataclass(frozen=True, slots=True)
class Delta:
    """What one request gained in one step: tokens, the text now safe to show, the end."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None  # stop, length, abort or error once finished
    logprobs: tuple[TokenLogprobs, ...] = ()
    error: str | None = None  # the message when finish_reason is "error"
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served (usage.cached_tokens)


@dataclass(slots=True, eq=False)
class Completion:
    """A request's output so far, built from its deltas by `add`; finished once
    `finish_reason` is set. The one accumulator: the offline API returns these and each
    HTTP choice keeps one."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when asked
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served
    _text: list[str] = field(default_factory=list)  # the deltas' text pieces

    def add(self, delta: Delta) -> None:
        """Record one step's delta."""
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.text:
            self._text.append(delta.text)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.error = delta.error

    @property
    def text(self) -> str:
        return "".join(self._text)
