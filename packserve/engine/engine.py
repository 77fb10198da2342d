"""The engine: scheduler + runner + text, stepped by one thread; the offline API on top."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from pathlib import Path

import torch

from packserve.kernels.invariant import INVARIANT_PREFILL_CHUNK
from packserve.kernels.loader import load_model
from packserve.kernels.machine import resolve_dtype
from packserve.kernels.runner import Runner, RunnerConfig
from packserve.models import resolve_model
from packserve.models.model_maker import cache_root
from packserve.scheduler import (
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    StructuredOutput,
    TokenEvent,
)

from .config import PREFILL_CONTEXT_COST, EngineConfig
from .lora import AdapterRegistry
from .outputs import Completion, Delta
from .stats import EngineInfo, EngineLoad, RunningRequest, StepStats
from .structured import GrammarCompiler, GrammarState
from .text import TextStream
from .threads import ThreadTuner

Prompt = str | Sequence[int]

log = logging.getLogger("packserve.engine")


class Engine:
    """Continuous batching with prepacked prefill over one model.

    Not thread-safe: one thread calls `add_request`, `abort`, `step` and `load` (the server's
    engine loop; or `generate`/`stream` offline). `info` and `tokenizer` may be read anywhere.
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        _check_kv_memory(config)  # before loading anything
        dtype = resolve_dtype(config.dtype, config.device)
        self.model_path = resolve_model(config.model)  # what transformers loads
        self.model, self.tokenizer = load_model(
            self.model_path, dtype, config.device, config.trust_remote_code
        )
        max_model_len = config.resolved_max_model_len(
            getattr(self.model.config, "max_position_embeddings", None)
        )
        eos_token_ids = frozenset(self._eos_token_ids())
        self.runner = Runner(self.model, _runner_config(config, max_model_len, eos_token_ids))
        if kept := self.runner.quantization.kept:
            name, reason = kept[0]
            log.warning(
                f"--quantization {config.quantization}: {len(kept)} linear layers stay "
                f"{dtype}, e.g. {name}: {reason}"
            )
        # Intra-op threads of each step: the flag's, else torch's at start, or one fewer while
        # that decodes faster (threads.py); not tuned in batch-invariant mode (its bitwise
        # contract holds for one thread count) nor off the CPU.
        self.threads = config.threads or torch.get_num_threads()
        tuned = config.threads is None and not config.batch_invariant and self.threads > 1
        tuned = tuned and self.model.device.type == "cpu"
        self.thread_tuner = ThreadTuner((self.threads, self.threads - 1)) if tuned else None
        scheduler_config = _scheduler_config(config, max_model_len, self.runner.kv_cache.num_blocks)
        self.scheduler = Scheduler(scheduler_config, eos_token_ids)
        self.info = EngineInfo(
            max_model_len=max_model_len,
            vocab_size=self.model.config.vocab_size,
            eos_token_ids=eos_token_ids,
            block_size=scheduler_config.block_size,
            num_kv_blocks=scheduler_config.num_kv_blocks,
            max_num_seqs=scheduler_config.max_num_seqs,
            max_num_batched_tokens=scheduler_config.max_num_batched_tokens,
            row_capacity=scheduler_config.row_capacity,
            prefill_mode=scheduler_config.prefill_mode,
            batch_invariant=config.batch_invariant,
            prefix_caching=config.enable_prefix_caching,
            dtype=dtype,
            linear_backend=self.runner.linear.backend,
            decode_attention=self.runner.decode.kernel,
            threads=self.threads,
            threads_tuned=self.thread_tuner is not None,
            quantization=config.quantization,
            max_loras=scheduler_config.max_loras,
        )
        self.last_stats: StepStats | None = None
        self.grammars = GrammarCompiler(self.tokenizer, self.info.vocab_size, eos_token_ids)
        self._grammar_state = GrammarState(self.info.vocab_size, len(self.tokenizer))
        # Constrained requests whose grammar is still compiling, in arrival order.
        self._compiling: dict[str, tuple[Request, Future]] = {}
        self._texts: dict[str, TextStream] = {}
        self._ids = itertools.count()
        self.adapters = AdapterRegistry(config.max_lora_rank)
        for name, path in config.lora_paths.items():
            self.adapters.register(name, path)
        self._adapter_failures: list[Delta] = []  # requests ended by an unload, sent next step

    # -- the loop's interface -------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        return list(prompt)

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        adapter: str | None = None,
    ) -> str:
        """Queue a prompt (text or token ids); a lower `priority` is scheduled first;
        `adapter`: the LoRA adapter it runs with (None: the base model). Raises ValueError if
        it cannot be served, UnknownAdapter if no such adapter is loaded."""
        request_id = request_id or f"req-{next(self._ids)}"
        token_ids = self.tokenize(prompt)
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in 0..{vocab - 1}")
        request = Request(request_id, token_ids, params, priority=priority)
        if adapter is not None:
            request.adapter = adapter
            request.cache_salt = self.adapters.get(adapter).cache_salt
        text = TextStream(self.tokenizer, params.stop, params.min_tokens)
        if params.structured is not None:
            future = self.grammars.compile(params.structured)
            if not future.done():  # scheduled once compiled, never waited for in a step
                self._compiling[request_id] = (request, future)
                self._texts[request_id] = text
                return request_id
            self._grammar_state.add(request_id, future.result())  # raises GrammarError
        try:
            self.scheduler.add(request)
        except ValueError:
            self._grammar_state.remove(request_id)
            raise
        self._texts[request_id] = text
        return request_id

    def compile_grammar(self, constraint: StructuredOutput) -> Future:
        """Start compiling a constraint (or find it compiled); thread-safe. The future fails
        with a ValueError naming what is wrong if the constraint is invalid."""
        return self.grammars.compile(constraint)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks; False if it had already finished."""
        self._texts.pop(request_id, None)
        self._grammar_state.remove(request_id)
        if self._compiling.pop(request_id, None) is not None:
            return True
        return self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def load_lora(self, name: str, path: str) -> None:
        """Register an adapter at run time (its weights are read when first needed). Raises
        ValueError if LoRA is off, the name is taken or the folder cannot be served."""
        if not self.config.lora_enabled:
            raise ValueError("LoRA adapters are off: start with --allow-runtime-lora")
        self.adapters.register(name, path)

    def unload_lora(self, name: str) -> None:
        """Forget an adapter; its waiting and running requests end with an error (their deltas
        come with the next step). Raises UnknownAdapter if none has that name."""
        self.adapters.unregister(name)
        message = f"the LoRA adapter {name!r} was unloaded"
        ids = [r.request_id for r in self.scheduler.requests.values() if r.adapter == name]
        ids += [rid for rid, (r, _) in self._compiling.items() if r.adapter == name]
        for request_id in ids:
            self.abort(request_id)
            self._adapter_failures.append(Delta(request_id, (), "", "error", error=message))
        self.scheduler.lora.drop(name)

    @property
    def has_unfinished(self) -> bool:
        return (
            self.scheduler.has_unfinished or bool(self._compiling) or bool(self._adapter_failures)
        )

    def step(self) -> list[Delta]:
        """Schedule, run and sample once; one delta for every sequence that gained a token
        or ended. The step's figures are in `last_stats` afterwards (None if it did nothing)."""
        start = time.perf_counter()
        failed = self._take_compiled()  # constrained requests whose grammar did not compile
        failed += self._take_adapters()  # requests whose adapter could not be read
        output = self.scheduler.schedule()
        self.adapters.start(self.scheduler.lora.take_loads())
        if output.is_empty:  # nothing to run (a preemption may still have happened)
            stats = StepStats.of(output, time.perf_counter() - start)
            self.last_stats = stats if output.preempted_ids else None
            return failed
        tuner = self.thread_tuner
        threads = tuner.threads if tuner is not None else self.threads
        masks = self._grammar_state.masks(output.segments)
        try:
            result = self.runner.execute(output, threads, masks)
        except Exception as exc:  # the step's requests fail; everyone else carries on
            deltas = self._fail(output, f"{type(exc).__name__}: {exc}")
        else:
            deltas = [self._delta(event) for event in self.scheduler.update(output, result)]
            if tuner is not None and not output.prefills:
                tuner.observe(threads, time.perf_counter() - start, len(output.decodes))
        self.last_stats = StepStats.of(output, time.perf_counter() - start, threads)
        return failed + deltas

    def load(self) -> EngineLoad:
        """A snapshot of the engine's state, for readers on other threads."""
        scheduler = self.scheduler
        waiting = [*scheduler.waiting, *(r for r, _ in self._compiling.values())]
        return EngineLoad(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting + len(self._compiling),
            num_kv_blocks_used=scheduler.allocator.num_used,
            num_kv_blocks=scheduler.allocator.num_blocks,
            running=tuple(
                RunningRequest(
                    r.request_id,
                    len(r.prompt_token_ids),
                    len(r.output_token_ids),
                    r.arrival_time,
                    r.adapter,
                )
                for r in scheduler.running
            ),
            waiting_adapters=tuple(sorted({r.adapter for r in waiting if r.adapter is not None})),
            num_lora_loads_total=scheduler.lora.num_loads_total,
            num_lora_evictions_total=scheduler.lora.num_evictions_total,
        )

    # -- offline API ----------------------------------------------------------------------------

    def stream(self, prompts: Sequence[Prompt], params: SamplingParams) -> Iterator[Delta]:
        """Run prompts to completion, yielding every step's deltas as they come."""
        for prompt in prompts:
            self.add_request(prompt, params)
        while self.has_unfinished:
            yield from self.step()

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """Run prompts to completion; results in prompt order."""
        outputs = []
        for prompt in prompts:
            token_ids = self.tokenize(prompt)
            outputs.append(Completion(self.add_request(token_ids, params), tuple(token_ids)))
        by_id = {out.request_id: out for out in outputs}
        while self.has_unfinished:
            for delta in self.step():
                by_id[delta.request_id].add(delta)
        return outputs

    # -- internals ------------------------------------------------------------------------------

    def _take_compiled(self) -> list[Delta]:
        """Schedule the constrained requests whose grammar is ready; an error delta for each
        whose grammar failed. With nothing else to run, wait briefly for a compile."""
        if not self._compiling:
            return []
        if not self.scheduler.has_unfinished:
            wait([f for _, f in self._compiling.values()], 0.05, "FIRST_COMPLETED")
        failed = []
        for request_id, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            try:
                self._grammar_state.add(request_id, future.result())
                self.scheduler.add(request)  # a request it refuses fails alone
            except ValueError as exc:
                self._grammar_state.remove(request_id)
                del self._texts[request_id]
                failed.append(Delta(request_id, (), "", "error", error=str(exc)))
        return failed

    def _take_adapters(self) -> list[Delta]:
        """Copy the adapters read since the last step into their pool slots (the scheduler
        admits their requests from this step on); an error delta for each request waiting on
        one that could not be read. With nothing running, wait briefly for a read."""
        failed, self._adapter_failures = self._adapter_failures, []
        if not self.adapters.num_reading:
            return failed
        lora = self.scheduler.lora
        waiting = self.scheduler.waiting
        if not self.scheduler.running and all(
            r.adapter is not None and not lora.is_loaded(r.adapter) for r in waiting
        ):
            self.adapters.wait(0.05)
        for read in self.adapters.take_finished():
            error = read.error
            if error is None and read.weights is not None:
                try:
                    self.runner.load_lora(read.slot, read.weights)
                except ValueError as exc:
                    error = str(exc)
                else:
                    lora.mark_loaded(read.name)
                    continue
            lora.drop(read.name)
            self.adapters.unregister(read.name)
            message = f"the LoRA adapter {read.name!r} could not be loaded: {error}"
            log.error(message)
            for request in list(self.scheduler.waiting):
                if request.adapter == read.name:
                    self.abort(request.request_id)
                    failed.append(Delta(request.request_id, (), "", "error", error=message))
        return failed

    def _delta(self, event: TokenEvent) -> Delta:
        request_id = event.request_id
        text_stream = self._texts[request_id]
        text = text_stream.push(event.new_token_ids)
        reason = event.finish_reason
        if reason is None and text_stream.stopped:  # a stop string ended it
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED)
            reason = "stop"
        error = None
        if request_id in self._grammar_state:
            ended = self._grammar_state.advance(request_id, event.new_token_ids)
            if reason is None and ended is not None:  # the grammar is complete (or broke)
                status = RequestStatus.FINISHED_STOPPED
                if ended == "error":
                    status = RequestStatus.FINISHED_ERROR
                    error = "the grammar rejected a sampled token"
                self.scheduler.finish_request(request_id, status)
                reason = ended
            if reason is not None:
                self._grammar_state.remove(request_id)
        if reason is not None:
            text += text_stream.finish()
            del self._texts[request_id]
        return Delta(
            event.request_id,
            event.new_token_ids,
            text,
            reason,
            event.logprobs,
            num_cached_tokens=event.num_cached_tokens,
            error=error,
        )

    def _fail(self, output: SchedulerOutput, message: str) -> list[Delta]:
        deltas = []
        for seq in output.segments:
            self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_ERROR)
            self._texts.pop(seq.request_id, None)
            self._grammar_state.remove(seq.request_id)
            deltas.append(Delta(seq.request_id, (), "", "error", error=message))
        return deltas

    def _eos_token_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def _runner_config(
    config: EngineConfig, max_model_len: int, eos_token_ids: frozenset[int]
) -> RunnerConfig:
    return RunnerConfig(
        attention_backend=config.attention_backend,
        linear_backend=config.linear_backend,
        decode_attention=config.decode_attention,
        quantization=config.quantization,
        int4_group_size=config.int4_group_size,
        kernel_cache_dir=kernel_cache_dir(),
        block_size=config.block_size,
        kv_cache_memory_bytes=config.kv_cache_memory_mb << 20,
        num_kv_blocks=config.num_kv_blocks,
        seed=config.seed,
        batch_invariant=config.batch_invariant,
        max_model_len=max_model_len,
        eos_token_ids=eos_token_ids,
        max_loras=config.max_loras if config.lora_enabled else 0,
        max_lora_rank=config.max_lora_rank,
    )


def kernel_cache_dir() -> Path:
    """Where measured kernel choices are cached: next to the models (PACKSERVE_CACHE_DIR)."""
    return cache_root() / "kernels"


def _scheduler_config(
    config: EngineConfig, max_model_len: int, num_kv_blocks: int
) -> SchedulerConfig:
    align = INVARIANT_PREFILL_CHUNK if config.batch_invariant else 0
    return SchedulerConfig(
        max_model_len=max_model_len,
        num_kv_blocks=num_kv_blocks,
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_prefill_tokens_while_decoding=max(config.max_prefill_tokens_while_decoding, align),
        # Aligned chunks must fit whole: batch-invariant mode charges tokens alone.
        prefill_context_cost=0 if align else PREFILL_CONTEXT_COST,
        max_prefill_row_len=config.max_prefill_row_len,
        prefill_mode=config.prefill_mode,
        mix_decodes=config.prefill_mode == "packed" and not config.batch_invariant,
        policy=config.scheduling_policy,
        fairness_steps=config.fairness_steps,
        enable_prefix_caching=config.enable_prefix_caching,
        chunk_align=align,
        replay_preempted=config.batch_invariant,
        max_loras=config.max_loras if config.lora_enabled else 0,
    )


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo; None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_kv_memory(config: EngineConfig) -> None:
    """A CPU KV pool larger than the memory available now would be killed later, not now
    (Linux hands out untouched pages lazily): refuse it before loading anything."""
    if config.num_kv_blocks is not None or config.device != "cpu":
        return
    available = _available_memory_bytes()
    if available is not None and config.kv_cache_memory_mb << 20 > available:
        raise MemoryError(
            f"the KV pool (--kv-cache-memory-mb {config.kv_cache_memory_mb}) is larger than "
            f"the memory available ({available >> 20} MiB)"
        )
