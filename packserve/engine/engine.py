"""The engine: scheduler + runner + text, stepped by one thread; the offline API on top."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from packserve.kernels.attention import AttentionBackend
from packserve.kernels.loader import load_model
from packserve.kernels.runner import LinearBackend, Runner, RunnerConfig
from packserve.models import resolve_model
from packserve.scheduler import (
    PrefillMode,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    StepStats,
    TokenEvent,
    TokenLogprobs,
)

from .text import TextStream

Prompt = str | Sequence[int]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything that shapes an engine; the server's settings hold one of these."""

    model: str | None = None  # folder, hub id or .gguf file; None: SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    max_model_len: int | None = None  # None: the model's context, capped at 4096
    attention_backend: AttentionBackend = "varlen"
    linear_backend: LinearBackend = "onednn"
    prefill_mode: PrefillMode = "packed"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: max(4096, max_model_len)
    max_prefill_row_len: int = 0  # 0: max_model_len
    kv_cache_memory_bytes: int = 1 << 30
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_bytes
    packing_window_s: float = 0.0
    seed: int | None = None  # for requests without a seed
    # Bitwise batch invariance: a request's logits do not depend on the rest of the step.
    batch_invariant: bool = False

    def resolved_max_model_len(self, model_max_len: int) -> int:
        return self.max_model_len or min(model_max_len, 4096)

    def runner_config(self, model_max_len: int) -> RunnerConfig:
        return RunnerConfig(
            attention_backend=self.attention_backend,
            linear_backend=self.linear_backend,
            block_size=self.block_size,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            num_kv_blocks=self.num_kv_blocks,
            seed=self.seed,
            batch_invariant=self.batch_invariant,
            max_model_len=self.resolved_max_model_len(model_max_len),
        )

    def scheduler_config(self, model_max_len: int, num_kv_blocks: int) -> SchedulerConfig:
        max_model_len = self.resolved_max_model_len(model_max_len)
        return SchedulerConfig(
            max_model_len=max_model_len,
            num_kv_blocks=num_kv_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or max(4096, max_model_len),
            max_prefill_row_len=self.max_prefill_row_len,
            prefill_mode=self.prefill_mode,
            packing_window_s=self.packing_window_s,
            replay_preempted=self.batch_invariant,
        )


@dataclass(frozen=True, slots=True)
class Delta:
    """What one request gained in one step: tokens, the text now safe to show, the end."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None  # stop, length, abort or error once finished
    logprobs: tuple[TokenLogprobs, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished request, as the offline API returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprobs, ...]


class Engine:
    """Continuous batching with prepacked prefill over one model.

    Not thread-safe: one thread calls `add_request`, `abort` and `step` (the server's engine
    loop; or `generate`/`stream` offline).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model, self.tokenizer = load_model(
            resolve_model(config.model), config.dtype, config.device, config.trust_remote_code
        )
        model_max_len = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.runner = Runner(self.model, config.runner_config(model_max_len))
        self.scheduler = Scheduler(
            config.scheduler_config(model_max_len, self.runner.kv_cache.num_blocks),
            eos_token_ids=frozenset(self._eos_token_ids()),
        )
        self.last_stats: StepStats | None = None
        self._texts: dict[str, TextStream] = {}
        self._ids = itertools.count()

    # -- the loop's interface -------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        return list(prompt)

    def add_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Queue a prompt (text or token ids). Raises ValueError if it cannot be served."""
        request_id = request_id or f"req-{next(self._ids)}"
        token_ids = self.tokenize(prompt)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        self.scheduler.add(Request(request_id, token_ids, params))
        self._texts[request_id] = TextStream(self.tokenizer, params.stop)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks; False if it had already finished."""
        self._texts.pop(request_id, None)
        return self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[Delta]:
        """Schedule, run and sample once; one delta for every sequence that ran."""
        start = time.perf_counter()
        output = self.scheduler.schedule()
        if output.is_empty:
            return []
        try:
            result = self.runner.execute(output)
        except Exception as exc:  # the step's requests fail; everyone else carries on
            deltas = self._fail(output, f"{type(exc).__name__}: {exc}")
        else:
            deltas = [self._delta(event) for event in self.scheduler.update(output, result)]
        self.last_stats = self._stats(output, time.perf_counter() - start)
        return deltas

    # -- offline API ----------------------------------------------------------------------------

    def stream(self, prompts: Sequence[Prompt], params: SamplingParams) -> Iterator[Delta]:
        """Run prompts to completion, yielding every step's deltas as they come."""
        for prompt in prompts:
            self.add_request(prompt, params)
        while self.has_unfinished:
            yield from self.step()

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """Run prompts to completion; results in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        prompt_ids = {r: tuple(self.scheduler.requests[r].prompt_token_ids) for r in ids}
        tokens: dict[str, list[int]] = {r: [] for r in ids}
        texts: dict[str, list[str]] = {r: [] for r in ids}
        logprobs: dict[str, list[TokenLogprobs]] = {r: [] for r in ids}
        reasons: dict[str, str] = {}
        while self.has_unfinished:
            for d in self.step():
                tokens[d.request_id] += d.token_ids
                texts[d.request_id].append(d.text)
                logprobs[d.request_id] += d.logprobs
                if d.finish_reason:
                    reasons[d.request_id] = d.finish_reason
        return [
            Completion(
                r,
                prompt_ids[r],
                tuple(tokens[r]),
                "".join(texts[r]),
                reasons[r],
                tuple(logprobs[r]),
            )
            for r in ids
        ]

    # -- internals ------------------------------------------------------------------------------

    def _delta(self, event: TokenEvent) -> Delta:
        text_stream = self._texts[event.request_id]
        text = text_stream.push(event.new_token_ids)
        reason = event.finish_reason
        if reason is None and text_stream.stopped:  # a stop string ended it
            self.scheduler.finish_request(event.request_id, RequestStatus.FINISHED_STOPPED)
            reason = "stop"
        if reason is not None:
            text += text_stream.finish()
            del self._texts[event.request_id]
        return Delta(event.request_id, event.new_token_ids, text, reason, event.logprobs)

    def _fail(self, output: SchedulerOutput, message: str) -> list[Delta]:
        deltas = []
        for seq in (*output.prefills, *output.decodes):
            self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_ERROR)
            self._texts.pop(seq.request_id, None)
            deltas.append(Delta(seq.request_id, (), "", "error", error=message))
        return deltas

    def _stats(self, output: SchedulerOutput, seconds: float) -> StepStats:
        allocator = self.scheduler.allocator
        return StepStats(
            prefill_rows=tuple(tuple(seq.num_tokens for seq in row) for row in output.prefill_bins),
            num_decode_tokens=len(output.decodes),
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks_used=allocator.num_used,
            num_kv_blocks=allocator.num_blocks,
            num_preempted=len(output.preempted_ids),
            step_time_s=seconds,
        )

    def _eos_token_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
