"""Scheduler configuration: the budgets every step is packed under."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PrefillMode = Literal["packed", "padded"]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Budgets and policies of the scheduler. Validated on construction. No defaults: the
    engine derives every field from its EngineConfig (where the defaults live) and the model."""

    max_model_len: int  # longest sequence (prompt + output) a request may reach
    num_kv_blocks: int  # size of the KV pool, in blocks
    block_size: int  # tokens per KV block
    max_num_seqs: int  # cap on running sequences (the decode batch)
    max_num_batched_tokens: int  # per-step token budget (prefill tokens + decode tokens)
    max_prefill_row_len: int  # widest packed prefill row; 0 means max_model_len
    prefill_mode: PrefillMode  # "packed": FFD rows; "padded": one prompt per row
    # After a preemption, prefill the prompt only and feed the generated tokens back one per
    # decode step (bitwise the computation they first had) instead of prefilling them all.
    replay_preempted: bool

    def __post_init__(self) -> None:
        if self.max_model_len < 1 or self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("max_model_len, block_size and max_num_seqs must be positive")
        if self.num_kv_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV pool ({self.num_kv_blocks} blocks of {self.block_size}) cannot hold "
                f"one sequence of max_model_len={self.max_model_len}"
            )
        # No chunked prefill: any admissible prompt must fit one step and one row.
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("max_num_batched_tokens must be >= max_model_len")
        if self.max_prefill_row_len and self.max_prefill_row_len < self.max_model_len:
            raise ValueError("max_prefill_row_len must be 0 or >= max_model_len")
        if self.prefill_mode not in ("packed", "padded"):
            raise ValueError(f"unknown prefill_mode {self.prefill_mode!r}")

    @property
    def row_capacity(self) -> int:
        """Tokens one packed prefill row may hold."""
        return self.max_prefill_row_len or self.max_model_len
