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
    num_prompt_tokens: int  # positions below this hold the prompt, the rest generated tokens
    output_token_ids: tuple[int, ...]  # generated before a preemption; () when first admitted
    block_ids: tuple[int, ...]  # block table at admission: position // block_size -> block id


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One segment of a request's work in a step: a prefill (the known tokens from 0, after
    an admission) or a decode (one token). Carries only what changed since the last step:
    the request's params, block table and generated tokens live with the runner."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens to run at positions start_pos, start_pos + 1, ...
    start_pos: int  # position of token_ids[0]: 0 for a prefill, the context length for a decode
    new_block_ids: tuple[int, ...]  # appended to the request's block table this step

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

    The runner keeps per-request state from `new_requests` and drops it for the ids in
    `preempted_ids` and `finished_ids`, before anything else in the step; a request id may
    be finished and admitted anew in the same step. A step with no work need not run: its
    `finished_ids` are empty (they go with the next step that has work), and a request it
    preempted is either admitted again (its `NewRequest` replaces what the runner held) or
    ends (its id comes in `finished_ids`).
    """

    new_requests: tuple[NewRequest, ...]  # admitted this step, in admission order
    prefill_bins: tuple[tuple[ScheduledSequence, ...], ...]  # [num_rows][segments in the row]
    decodes: tuple[ScheduledSequence, ...]  # running requests, one token each, admission order
    preempted_ids: tuple[str, ...]  # requests preempted (requeued for recompute) this step
    # Requests that ended (finished, aborted, failed) since the last step with work; a step
    # with no work is never run, so it leaves them for the next one.
    finished_ids: tuple[str, ...]

    @property
    def prefills(self) -> tuple[ScheduledSequence, ...]:
        return tuple(seq for row in self.prefill_bins for seq in row)

    @property
    def is_empty(self) -> bool:
        """No work: nothing to prefill or decode (the step need not run)."""
        return not self.prefill_bins and not self.decodes


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities around one sampled token."""

    logprob: float  # of the sampled token
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """What one forward step produced: one sampled token per scheduled sequence."""

    sampled_token_ids: Mapping[str, int]  # request_id -> token sampled this step
    logprobs: Mapping[str, TokenLogprobs]  # request_id -> logprobs, for requests that asked


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A delta for one request: the tokens it gained this step and whether it finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None  # OpenAI finish_reason once finished: stop, length, abort, error
    logprobs: tuple[TokenLogprobs, ...] = ()
