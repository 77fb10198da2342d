"""Request fields past pydantic: what is refused or ignored, the fields that convert (logit_bias,
chat's two names for max_tokens), and OpenAI's context-overflow error."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .protocol import APIError, ChatCompletionRequest, SamplingFields

log = logging.getLogger("packserve.requests")

MAX_LOGGED_NAMES = 64  # ignored unknown fields are logged once per name, for this many names


def _unset(value: Any) -> bool:
    return value is None


# OpenAI fields this server does not implement -> whether a value asks for nothing (accepted).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda value: value is None or value == 1,
    "suffix": lambda value: value is None or value == "",
    "modalities": lambda value: value is None or value == ["text"],
    "audio": _unset,
    "prediction": _unset,
    "web_search_options": _unset,
    "reasoning_effort": _unset,
    "functions": _unset,
    "function_call": _unset,
}


class FieldCheck:
    """Refuses a request with a field the server would not honour: an OpenAI field it does
    not implement (always), an unknown one (unless `allow_unknown`: then it is ignored and
    its name logged once), or fields that contradict each other."""

    def __init__(self, allow_unknown: bool) -> None:
        self.allow_unknown = allow_unknown
        self._logged: set[str] = set()

    def check(self, body: SamplingFields) -> None:
        for name, value in (body.model_extra or {}).items():
            accepted = UNSUPPORTED.get(name)
            if accepted is not None:
                if not accepted(value):
                    raise APIError(
                        400,
                        f"Unsupported parameter: '{name}' is not supported by this server.",
                        param=name,
                        code="unsupported_parameter",
                    )
            elif not self.allow_unknown:
                raise APIError(
                    400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
                )
            else:
                self._log(name)
        if isinstance(body, ChatCompletionRequest) and body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def _log(self, name: str) -> None:
        """Once per name, for the first MAX_LOGGED_NAMES names (a client inventing names
        cannot flood the log)."""
        if name in self._logged or len(self._logged) > MAX_LOGGED_NAMES:
            return
        self._logged.add(name)
        if len(self._logged) > MAX_LOGGED_NAMES:
            log.warning(f"more than {MAX_LOGGED_NAMES} unknown fields ignored; no more logged")
            return
        log.warning("unknown request field ignored", extra={"fields": {"field": name[:100]}})


def logit_bias(body: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """The body's logit_bias as (token id, bias) pairs; keys must be token ids in the vocabulary."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise APIError(
                400,
                f"logit_bias keys must be token ids in 0..{vocab_size - 1}, not {key[:40]!r}",
                param="logit_bias",
            )
        pairs.append((token, bias))
    if len({token for token, _ in pairs}) < len(pairs):
        raise APIError(400, "logit_bias names a token id twice", param="logit_bias")
    return tuple(sorted(pairs))


def chat_max_tokens(body: ChatCompletionRequest) -> int | None:
    """max_completion_tokens, or max_tokens, its older name; both given must agree."""
    newer, older = body.max_completion_tokens, body.max_tokens
    if newer is not None and older is not None and newer != older:
        raise APIError(
            400,
            "max_tokens and max_completion_tokens differ; send max_completion_tokens alone",
            param="max_completion_tokens",
        )
    return older if newer is None else newer


def check_context(
    num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str
) -> None:
    """400 unless the prompt and `max_tokens` (None: at least one token) fit the context, in
    OpenAI's words: LiteLLM maps them to ContextWindowExceededError."""
    if max_tokens is None:
        if num_prompt_tokens < max_model_len:
            return
        detail = (
            f"However, your {param} resulted in {num_prompt_tokens} tokens. "
            f"Please reduce the length of the {param}."
        )
    else:
        if num_prompt_tokens + max_tokens <= max_model_len:
            return
        detail = (
            f"However, you requested {num_prompt_tokens + max_tokens} tokens "
            f"({num_prompt_tokens} in the {param}, {max_tokens} in the completion). "
            f"Please reduce the length of the {param} or completion."
        )
    raise APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. {detail}",
        param=param,
        code="context_length_exceeded",
    )
