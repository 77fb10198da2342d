"""The step contract: what the scheduler hands the runner, what comes back, what is emitted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .request import SamplingParams


@dataclass(frozen=True, slots=True)
class NewRequest:
    """What the runner keeps about a request, sent once: when the request is admitted, and
    again when it is re-admitted after a preemption (the runner dropped it then). Later steps
    send only what changed, in its `ScheduledSequence`."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: tuple[int, ...]  # the repetition penalty counts them
    output_token_ids: tuple[int, ...]  # generated before a preemption; () when first admitted
    block_ids: tuple[int, ...]  # block table at admission: position // block_size -> block id
    lora_slot: int = -1  # the pool slot of its LoRA adapter while it runs; -1: the base model

    @property
    def num_prompt_tokens(self) -> int:
        """Positions below this hold the prompt, the rest generated tokens."""
        return len(self.prompt_token_ids)


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One segment of a request's work in a step: a piece of its prefill (the whole prompt,
    a chunk of it, or what follows a prefix-cache hit) or a decode (one token). It attends to
    the request's cached tokens before `start_pos` and causally to itself. Carries only what
    changed since the last step: params, block table and generated tokens live with the
    runner."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens to run at positions start_pos, start_pos + 1, ...
    start_pos: int  # position of token_ids[0]: the tokens before it are in the KV cache
    new_block_ids: tuple[int, ...]  # appended to the request's block table this step
    is_decode: bool  # one token after the prefill (a new one, or a replayed one)
    # The step samples a token after the last one: the segment reaches the end of the
    # request's known tokens (a prefill's last chunk, a decode that is not a replay).
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """Position after the last token run: the context the request has once it ran."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """Everything the runner does in one step, as a delta on what it already holds.

    The step's segments run as one packed forward (`rows`, FFD), except where decode tokens
    are kept apart (`decode_batch`: batch-invariant mode, where a forward's tile height
    follows its phase, and the padded baseline); either way the step holds at most the
    scheduler's token budget.

    The runner keeps per-request state from `new_requests` and drops it for the ids in
    `preempted_ids` and `finished_ids`, before anything else in the step; a request id may
    be finished and admitted anew in the same step. A step with no work need not run: its
    `finished_ids` are empty (they go with the next step that has work), and a request it
    preempted is either admitted again (its `NewRequest` replaces what the runner held) or
    ends (its id comes in `finished_ids`).
    """

    new_requests: tuple[NewRequest, ...]  # admitted this step, in admission order
    rows: tuple[tuple[ScheduledSequence, ...], ...]  # [num_rows][segments in the row]
    decode_batch: tuple[ScheduledSequence, ...]  # decode tokens run as a forward of their own
    preempted_ids: tuple[str, ...]  # requests preempted (requeued for recompute) this step
    # Requests that ended (finished, aborted, failed) since the last step with work; a step
    # with no work is never run, so it leaves them for the next one.
    finished_ids: tuple[str, ...]
    num_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache on admission
    num_cache_hit_tokens: int = 0  # of those, found (their prefill is skipped)

    @property
    def segments(self) -> tuple[ScheduledSequence, ...]:
        """Every segment of the step: the rows' in row order, then the decode batch."""
        return (*(seq for row in self.rows for seq in row), *self.decode_batch)

    @property
    def prefills(self) -> tuple[ScheduledSequence, ...]:
        return tuple(seq for seq in self.segments if not seq.is_decode)

    @property
    def decodes(self) -> tuple[ScheduledSequence, ...]:
        return tuple(seq for seq in self.segments if seq.is_decode)

    @property
    def num_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.segments)

    @property
    def is_empty(self) -> bool:
        """No work: nothing to prefill or decode (the step need not run)."""
        return not self.rows and not self.decode_batch


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities around one sampled token."""

    logprob: float  # of the sampled token
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """What one step produced: one token for each segment that samples."""

    sampled_token_ids: Mapping[str, int]  # request_id -> token sampled this step
    logprobs: Mapping[str, TokenLogprobs]  # request_id -> logprobs, for requests that asked


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A delta for one request: the tokens it gained this step and whether it finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None  # OpenAI finish_reason once finished: stop, length, abort, error
    logprobs: tuple[TokenLogprobs, ...] = ()
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
