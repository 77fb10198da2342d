"""Scheduler configuration: the budgets every step is packed under, and its policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PrefillMode = Literal["packed", "padded"]
# The order in which prefills are served, after priority: the shortest uncached prefill first
# (with a fairness bound), or arrival order.
SchedulingPolicy = Literal["shortest-first", "fcfs"]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Budgets and policies of the scheduler. Validated on construction. No defaults: the
    engine derives every field from its EngineConfig (where the defaults live) and the model."""

    max_model_len: int  # longest sequence (prompt + output) a request may reach
    num_kv_blocks: int  # size of the KV pool, in blocks
    block_size: int  # tokens per KV block
    max_num_seqs: int  # cap on running sequences (the decode batch)
    max_num_batched_tokens: int  # per-step token budget (prefill tokens + decode tokens)
    # Prefill tokens a step may hold while sequences decode: bounds how much longer than a
    # decode step such a step takes (the gap between a running stream's tokens).
    max_prefill_tokens_while_decoding: int
    # While sequences decode, a prefill token after c cached tokens counts as
    # 1 + c / prefill_context_cost tokens (its attention grows with c); 0: every token as one.
    prefill_context_cost: int
    max_prefill_row_len: int  # widest packed row; 0 means the step budget
    prefill_mode: PrefillMode  # "packed": FFD rows; "padded": one segment per row
    # Decode tokens join the packed rows (one forward per step) rather than a forward of
    # their own. Off in batch-invariant mode (a forward's tile height follows its phase) and
    # in padded mode (the unpacked baseline).
    mix_decodes: bool
    policy: SchedulingPolicy
    # A prompt overtaken by shorter ones in this many steps is served before them.
    fairness_steps: int
    enable_prefix_caching: bool
    # 0: a prompt is cut into chunks wherever the step's budget ends. k > 0 (batch-invariant
    # mode): chunks start and end at multiples of k (or at the prompt's end), so a prompt is
    # always computed in the same pieces, and only whole chunks computed by a prefill are
    # cached and reused: the K/V a prefix hit reuses is bitwise what the request computes.
    chunk_align: int
    # After a preemption, prefill the prompt only and feed the generated tokens back one per
    # decode step (bitwise the computation they first had) instead of prefilling them all.
    replay_preempted: bool
    max_loras: int = 0  # LoRA adapters resident at once (the runner's pool slots); 0: none

    def __post_init__(self) -> None:
        if self.max_model_len < 1 or self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("max_model_len, block_size and max_num_seqs must be positive")
        if self.num_kv_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV pool ({self.num_kv_blocks} blocks of {self.block_size}) cannot hold "
                f"one sequence of max_model_len={self.max_model_len}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode each)")
        if self.max_prefill_tokens_while_decoding < max(self.chunk_align, 1):
            raise ValueError("max_prefill_tokens_while_decoding must be >= max(chunk_align, 1)")
        if self.prefill_context_cost < 0 or (self.chunk_align and self.prefill_context_cost):
            raise ValueError("prefill_context_cost must be >= 0, and 0 with chunk_align")
        if self.max_prefill_row_len < 0:
            raise ValueError("max_prefill_row_len must be 0 (the step budget) or positive")
        if self.max_loras < 0:
            raise ValueError("max_loras must be >= 0")
        if self.prefill_mode not in ("packed", "padded"):
            raise ValueError(f"unknown prefill_mode {self.prefill_mode!r}")
        if self.prefill_mode == "padded" and self.mix_decodes:
            raise ValueError("padded mode runs decodes apart (mix_decodes=False)")
        if self.policy not in ("shortest-first", "fcfs"):
            raise ValueError(f"unknown scheduling policy {self.policy!r}")
        if self.fairness_steps < 1:
            raise ValueError("fairness_steps must be positive")
        if self.chunk_align < 0 or self.chunk_align % self.block_size:
            raise ValueError("chunk_align must be 0 or a multiple of block_size")
        if self.chunk_align and (
            self.max_num_batched_tokens < self.chunk_align + self.max_num_seqs
            or self.row_capacity < self.chunk_align
        ):
            raise ValueError(
                "with chunk_align, a step must hold one chunk and a decode for every "
                "sequence, and a row one chunk"
            )

    @property
    def row_capacity(self) -> int:
        """Tokens one packed row may hold."""
        return min(
            self.max_prefill_row_len or self.max_num_batched_tokens, self.max_num_batched_tokens
        )
