"""The step contract: what the scheduler hands the runner, what comes back, what is emitted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .request import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One sequence's work in a step: a whole prefill, or one decode token."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens to run: a prefill's, or the one token a decode runs
    start_pos: int  # position of token_ids[0]; 0 for a prefill
    block_ids: tuple[int, ...]  # block table covering start_pos + len(token_ids) tokens
    params: SamplingParams
    output_token_ids: tuple[int, ...]  # generated so far (penalties, seeded draw index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """Everything the runner does in one step."""

    prefill_bins: tuple[tuple[ScheduledSequence, ...], ...]  # [num_rows][prompts in the row]
    decodes: tuple[ScheduledSequence, ...]  # running sequences, one new token each
    preempted_ids: tuple[str, ...]  # requests preempted (requeued for recompute) this step

    @property
    def prefills(self) -> tuple[ScheduledSequence, ...]:
        return tuple(seq for row in self.prefill_bins for seq in row)

    @property
    def row_lens(self) -> list[int]:
        """Real tokens in each prefill row."""
        return [sum(seq.num_tokens for seq in row) for row in self.prefill_bins]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.row_lens)

    @property
    def num_padded_prefill_tokens(self) -> int:
        """Tokens computed when every row is padded to the longest row."""
        return max(self.row_lens, default=0) * len(self.prefill_bins)

    @property
    def is_empty(self) -> bool:
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
    error: str | None = None  # message when finish_reason is "error"


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one engine step did; metrics, the dashboard and benchmarks read these."""

    prefill_rows: tuple[tuple[int, ...], ...]  # [row][prompt] token counts, in row order
    num_decode_tokens: int
    num_running: int  # after the step
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks: int
    num_preempted: int
    step_time_s: float

    @property
    def num_prefill_rows(self) -> int:
        return len(self.prefill_rows)

    @property
    def num_prefill_tokens(self) -> int:
        """Real prompt tokens prefilled."""
        return sum(map(sum, self.prefill_rows))

    @property
    def num_padded_prefill_tokens(self) -> int:
        """Tokens computed, padding included: every row padded to the longest."""
        return max(map(sum, self.prefill_rows), default=0) * len(self.prefill_rows)

    @property
    def bin_fill(self) -> float:
        """Real over computed prefill tokens; 1.0 when nothing was prefilled."""
        if not self.num_padded_prefill_tokens:
            return 1.0
        return self.num_prefill_tokens / self.num_padded_prefill_tokens

    @property
    def kv_cache_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks
