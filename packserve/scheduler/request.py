"""A request's sampling parameters, lifecycle status and state as the scheduler tracks it."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Literal

# A penalty multiplies or divides float32 logits: outside this range they overflow to +-inf
# (and a grammar's allowed tokens can all end at -inf), so the API refuses it.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the generated text."""

    kind: Literal["json_schema", "json_object", "regex", "grammar", "choice"]
    # schema JSON text / regex / grammar text / JSON list of strings; "" for json_object
    spec: str = ""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples and when it stops. Validated on construction."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: matched on text, outside the scheduler
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top k
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (vLLM)
    # > 1 discourages, < 1 favours every token of the prompt and the output (HF, vLLM)
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # until this many are generated: no EOS, stop token or stop string
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, added to its logit), OpenAI's
    structured: StructuredOutput | None = None  # grammar the output must follow (engine-side)

    def __post_init__(self) -> None:
        finite = (
            self.temperature,
            self.top_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.min_p,
            self.repetition_penalty,
            *(bias for _, bias in self.logit_bias),
        )
        if not all(math.isfinite(x) for x in finite):
            raise ValueError("sampling parameters must be finite numbers")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (off) or positive")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in 0..20")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bounds = f"[{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]"
            raise ValueError(f"repetition_penalty must be in {bounds}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in 0..max_tokens")
        bias_ids = [t for t, _ in self.logit_bias]
        if len(set(bias_ids)) < len(bias_ids) or min(bias_ids, default=0) < 0:
            raise ValueError("logit_bias maps distinct token ids >= 0 to biases")
        if not all(-100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        """Argmax: temperature 0, or one so small that dividing by it overflows (vLLM: 1e-5)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Every value from FINISHED_STOPPED on means finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason of a finished status, None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Request:
    """One generation request as the scheduler tracks it. Only the scheduler mutates it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower is served first (vLLM's convention)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # block table: position // block_size -> id
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    # Tokens computed by prefill since the last admission; the rest are decoded one per step.
    prefill_end: int = 0
    # Prompt tokens found in the prefix cache at the first admission (None before it).
    num_cached_tokens: int | None = None
    num_skipped_steps: int = 0  # steps in which later arrivals were served ahead of it
    block_hashes: list[bytes] = field(default_factory=list)  # chained digests of full blocks
    arrival_index: int = 0  # order of arrival, set by the scheduler
    adapter: str | None = None  # the LoRA adapter it runs with; None: the base model
    # Seeds its chain of block digests: requests with different salts never share KV (the
    # adapter's identity: its K/V differ from the base's and from every other adapter's).
    cache_salt: bytes = b""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def known_token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """The tokens at positions [start, end): the prompt's, then the generated ones.
        Costs end - start, never the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return tuple(self.prompt_token_ids[start:end])
        if start >= num_prompt:
            return tuple(self.output_token_ids[start - num_prompt : end - num_prompt])
        return (*self.prompt_token_ids[start:], *self.output_token_ids[: end - num_prompt])
