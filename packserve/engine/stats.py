"""What the engine tells the world: EngineInfo once, StepStats and EngineLoad every step.

The server reads only these (never the scheduler or the allocator, which the engine thread
mutates): EngineInfo is frozen at start-up, EngineLoad is a fresh snapshot the engine thread
publishes after each step, StepStats is the one home of every per-step figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from packserve.scheduler import SchedulerOutput


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Facts about a loaded engine that never change while it runs."""

    max_model_len: int  # tokens a request may reach, prompt and output together
    vocab_size: int  # token ids are in 0..vocab_size-1
    eos_token_ids: frozenset[int]
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # size of the KV pool
    max_num_seqs: int  # cap on running sequences
    max_num_batched_tokens: int  # token budget of one step
    row_capacity: int  # tokens one packed prefill row may hold
    prefill_mode: str  # packed or padded
    batch_invariant: bool
    prefix_caching: bool
    dtype: str  # what --dtype resolved to (auto: from the machine)
    linear_backend: str  # what --linear-backend resolved to (auto: measured)
    decode_attention: str  # what --decode-attention resolved to (auto: measured)
    threads: int  # intra-op threads of each step (--threads, else torch's at start)
    threads_tuned: bool  # steps may run on one thread fewer while it decodes faster
    quantization: str  # none, int8 or int4 (weight-only)
    max_loras: int = 0  # LoRA adapters resident at once; 0: LoRA off


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """One running request as the dashboard lists it: counts only, never tokens."""

    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float  # time.monotonic() when it was queued
    adapter: str | None = None  # its LoRA adapter; None: the base model


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The engine's state after a step (or after adds and aborts were drained)."""

    num_running: int
    num_waiting: int  # in the scheduler's queue
    num_kv_blocks_used: int
    num_kv_blocks: int
    running: tuple[RunningRequest, ...]  # in admission order
    waiting_adapters: tuple[str, ...] = ()  # LoRA adapters of waiting requests, distinct, sorted
    num_lora_loads_total: int = 0  # adapters copied into the pool since the start
    num_lora_evictions_total: int = 0  # adapters evicted from the pool to make room

    @property
    def running_adapters(self) -> tuple[str, ...]:
        """LoRA adapters of running requests, distinct, sorted."""
        return tuple(sorted({r.adapter for r in self.running if r.adapter is not None}))

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV pool in use, 0..1."""
        return self.num_kv_blocks_used / self.num_kv_blocks


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one engine step did; metrics, the dashboard and benchmarks read these."""

    # The packed forward's rows: [row][segment] token counts, in row order (prefill pieces,
    # and decode tokens where they are mixed in).
    prefill_rows: tuple[tuple[int, ...], ...]
    num_prefill_tokens: int  # prompt tokens run (and generated ones recomputed)
    num_decode_tokens: int
    num_sampled_tokens: int  # tokens generated: a prompt's last chunk and every new decode
    num_cache_query_tokens: int  # prompt tokens looked up in the prefix cache
    num_cache_hit_tokens: int  # of those, found
    num_preempted: int
    step_time_s: float
    threads: int = 0  # intra-op threads the step ran on; 0: it ran no forward

    @classmethod
    def of(cls, output: SchedulerOutput, step_time_s: float, threads: int = 0) -> StepStats:
        """The figures of one scheduled step."""
        return cls(
            prefill_rows=tuple(tuple(seq.num_tokens for seq in row) for row in output.rows),
            num_prefill_tokens=sum(seq.num_tokens for seq in output.prefills),
            num_decode_tokens=len(output.decodes),
            num_sampled_tokens=sum(seq.sample for seq in output.segments),
            num_cache_query_tokens=output.num_cache_query_tokens,
            num_cache_hit_tokens=output.num_cache_hit_tokens,
            num_preempted=len(output.preempted_ids),
            step_time_s=step_time_s,
            threads=threads,
        )

    @property
    def num_prefill_rows(self) -> int:
        return len(self.prefill_rows)

    @property
    def num_prefill_segments(self) -> int:
        """Segments in the packed rows."""
        return sum(map(len, self.prefill_rows))

    @property
    def num_row_tokens(self) -> int:
        """Real tokens in the packed rows."""
        return sum(map(sum, self.prefill_rows))

    @property
    def num_tokens(self) -> int:
        """Real tokens run: prefill and decode."""
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def num_padded_prefill_tokens(self) -> int:
        """Tokens the packed forward computes: every row padded to the longest row."""
        return max(map(sum, self.prefill_rows), default=0) * len(self.prefill_rows)

    @property
    def num_unpacked_prefill_tokens(self) -> int:
        """Tokens padded batching would compute: one segment per row, padded to the longest."""
        lengths = [n for row in self.prefill_rows for n in row]
        return max(lengths, default=0) * len(lengths)

    @property
    def bin_fill(self) -> float:
        """Real over computed tokens of the packed rows; 1.0 when there were none."""
        if not self.num_padded_prefill_tokens:
            return 1.0
        return self.num_row_tokens / self.num_padded_prefill_tokens
