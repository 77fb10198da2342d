"""The model runner: executes one scheduler step (packed prefill + ragged decode) and samples."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from transformers import PreTrainedModel

from packserve.scheduler import (
    NewRequest,
    RunnerOutput,
    SamplingParams,
    ScheduledSequence,
    SchedulerOutput,
)

from .autotune import DecodeChoice, LinearChoice, choose_decode_kernel, choose_linear_backend
from .choices import AttentionBackend, DecodeKernelChoice, LinearBackendChoice, Quantization
from .fused import fuse_shared_inputs
from .inputs import ModelInputs, step_inputs
from .invariant import (
    DEFAULT_DECODE_CONTEXT_PAD,
    DEFAULT_DECODE_TILE_ROWS,
    DEFAULT_PREFILL_TILE_ROWS,
    TileRows,
    make_batch_invariant,
)
from .kv_cache import KVCache, KVCacheSpec
from .linear import can_pack, pack_linears
from .lora import LoRAPool, LoRAWeights, token_slots
from .native import build as build_native
from .norms import swap_rms_norms
from .quant import QuantizationReport, quantize_linears
from .sampler import sample

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """How the runner computes attention and how large its KV pool is. The knobs have no
    defaults here: the engine derives them from its EngineConfig, where the defaults live."""

    attention_backend: AttentionBackend
    linear_backend: LinearBackendChoice  # "torch": leave the model's nn.Linear as is
    decode_attention: DecodeKernelChoice  # fused SDPA or batched matmuls, or the paged kernel
    quantization: Quantization  # weight-only int8 / int4 for the decoder (the LM head: int8)
    int4_group_size: int  # inputs per int4 scale and zero
    kernel_cache_dir: Path | None  # where the `auto` kernel choices cache their timings
    block_size: int
    kv_cache_memory_bytes: int  # the pool's size; the block count follows from it
    num_kv_blocks: int | None  # overrides the memory budget when set
    seed: int | None  # for requests without a seed of their own
    # Bitwise batch invariance (kernels/invariant.py): per-token modules on fixed row tiles,
    # a tabulated rotary embedding, attention shaped by each sequence alone, one thread count.
    batch_invariant: bool
    max_model_len: int  # positions the rotary table covers in batch-invariant mode
    eos_token_ids: frozenset[int]  # masked while a request is under its min_tokens
    prefill_tile_rows: int = DEFAULT_PREFILL_TILE_ROWS  # batch-invariant tile heights
    decode_tile_rows: int = DEFAULT_DECODE_TILE_ROWS
    # Batch-invariant decode attention runs over each context rounded up to this multiple.
    decode_context_pad: int = DEFAULT_DECODE_CONTEXT_PAD
    max_loras: int = 0  # LoRA adapter slots in the weight pool; 0: no adapters, no wrappers
    max_lora_rank: int = 0  # each slot's rank (adapters of lower rank use part of it)

    def __post_init__(self) -> None:
        if self.attention_backend not in get_args(AttentionBackend):
            raise ValueError(f"unknown attention backend {self.attention_backend!r}")
        if self.batch_invariant and self.attention_backend != "varlen":
            raise ValueError("batch-invariant mode needs the varlen attention backend")
        sizes = (self.prefill_tile_rows, self.decode_tile_rows, self.decode_context_pad)
        if min(*sizes, self.max_model_len) < 1:
            raise ValueError("tile sizes, decode_context_pad and max_model_len must be positive")
        if self.linear_backend not in get_args(LinearBackendChoice):
            raise ValueError(f"unknown linear backend {self.linear_backend!r}")
        if self.decode_attention not in get_args(DecodeKernelChoice):
            raise ValueError(f"unknown decode attention kernel {self.decode_attention!r}")
        if self.batch_invariant and self.decode_attention in ("matmul", "paged"):
            raise ValueError("batch-invariant mode attends through the fused kernel (sdpa)")
        if self.quantization not in get_args(Quantization):
            raise ValueError(f"unknown quantization {self.quantization!r}")
        if self.batch_invariant and self.quantization != "none":
            raise ValueError("batch-invariant mode runs unquantized weights only")
        if self.block_size < 1 or self.kv_cache_memory_bytes < 1:
            raise ValueError("block_size and kv_cache_memory_bytes must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be positive")
        if self.max_loras < 0 or (self.max_loras and self.max_lora_rank < 1):
            raise ValueError("max_loras must be >= 0, and max_lora_rank positive with adapters")


def kv_cache_spec(model: PreTrainedModel, block_size: int) -> KVCacheSpec:
    """The pool's shape for this model."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVCacheSpec(
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=model.dtype,
    )


@dataclass(slots=True, eq=False)
class RequestState:
    """What the runner keeps about one running request between steps: made from its
    `NewRequest`, grown by its segments and sampled tokens, dropped when the scheduler reports
    it preempted or finished. Sampling reads it (`sampler.SamplingRow`)."""

    params: SamplingParams
    prompt_token_ids: tuple[int, ...]  # the repetition penalty counts them
    output_token_ids: list[int]  # generated so far: penalties, the seeded draw index
    block_ids: list[int]  # block table: position // block_size -> block id
    lora_slot: int  # its adapter's slot in the LoRA pool; -1: the base model

    @classmethod
    def of(cls, new: NewRequest) -> RequestState:
        return cls(
            new.params,
            new.prompt_token_ids,
            list(new.output_token_ids),
            list(new.block_ids),
            new.lora_slot,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known: the prompt and every generated one."""
        return self.num_prompt_tokens + len(self.output_token_ids)


class Runner:
    """Owns the model and the KV tensors; `execute` runs one step and samples one token per
    scheduled sequence. The model must have been loaded with the `packserve` attention.

    Keeps each running request's state (`requests`) across steps: a step's `SchedulerOutput`
    sends only what changed.
    """

    def __init__(self, model: PreTrainedModel, config: RunnerConfig) -> None:
        self.model = model
        self.config = config
        # Quantized layers first: the backend choice then times (and packs) what is left.
        self.quantization: QuantizationReport = quantize_linears(
            model, config.quantization, config.int4_group_size
        )
        self.linear: LinearChoice = (
            choose_linear_backend(model, config.kernel_cache_dir)
            if config.linear_backend == "auto"
            else LinearChoice(config.linear_backend, "flag", None, None)
        )
        if self.linear.backend == "onednn" and not can_pack(model):
            log.warning(
                "--linear-backend onednn: oneDNN cannot pack this model's weights here "
                "(device %s, dtype %s); torch's linears run",
                model.device,
                model.dtype,
            )
            self.linear = LinearChoice("torch", "unpackable", None, None)
        pack = self.linear.backend == "onednn"
        if pack:
            pack_linears(model)
        # Batch-invariant mode keeps each projection's GEMM apart (each is tiled alone).
        if not config.batch_invariant:
            fuse_shared_inputs(model.get_decoder(), pack)
        # The C++ kernels, on a CPU where they build: the sampler's argmax, and norms in one
        # pass (batch-invariant mode tiles the model's own norms).
        native = build_native().kernels if model.device.type == "cpu" else None
        self.native_norms = 0
        if native is not None and not config.batch_invariant:
            self.native_norms = swap_rms_norms(model, native.rms_norm)
            log.info("%d RMSNorm modules run the C++ kernel", self.native_norms)
        self.argmax = native.row_argmax if native is not None else None
        # Adapters wrap the projections as they now are; batch-invariant tiles wrap them whole.
        self.lora: LoRAPool | None = None
        if config.max_loras:
            self.lora = LoRAPool(
                model, config.max_loras, config.max_lora_rank, merge=not config.batch_invariant
            )
        self.tiles: TileRows | None = None
        if config.batch_invariant:
            self.tiles = make_batch_invariant(model, config.decode_tile_rows, config.max_model_len)
        self.device = model.device
        spec = kv_cache_spec(model, config.block_size)
        num_blocks = config.num_kv_blocks or spec.num_blocks_for(config.kv_cache_memory_bytes)
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        self.decode: DecodeChoice
        if config.batch_invariant:
            self.decode = DecodeChoice("sdpa", "fixed", None, None)
        elif config.decode_attention == "auto":
            heads = model.config.num_attention_heads
            self.decode = choose_decode_kernel(spec, heads, self.device, config.kernel_cache_dir)
        else:
            self.decode = DecodeChoice(config.decode_attention, "flag", None, None)
        if self.decode.kernel == "paged":
            if self.device.type != "cpu":
                raise ValueError("the paged decode kernel runs on a CPU only")
            error = build_native().error
            if error is not None:
                raise RuntimeError(f"the paged decode kernel could not be built: {error}")
        self.generator = torch.Generator(device=self.device)
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()
        self.requests: dict[str, RequestState] = {}  # every request the scheduler runs, by id
        # The step's logits in float32, kept across steps: a fresh [64, 49152] each step cost
        # ~3 ms of page faults on a CPU (SmolLM2, profiled), the copy into this ~0.2 ms.
        self.logits_room = torch.empty(0, device=self.device)

    @torch.inference_mode()
    def execute(
        self,
        output: SchedulerOutput,
        threads: int,
        allowed: Mapping[str, torch.Tensor] | None = None,
    ) -> RunnerOutput:
        """Bring the request states up to date, run the packed rows (and the decode batch
        when it runs apart), sample a token for every segment that samples; on `threads`
        intra-op threads, the process's own count restored after. `allowed`: request_id ->
        bool [V], the tokens a constrained request may sample this step."""
        self._update_states(output)
        caller = torch.get_num_threads()
        if caller != threads:
            torch.set_num_threads(threads)
        try:
            return self._run(output, allowed)
        finally:
            if caller != threads:
                torch.set_num_threads(caller)

    def _run(
        self, output: SchedulerOutput, allowed: Mapping[str, torch.Tensor] | None
    ) -> RunnerOutput:
        """`execute`'s forwards and sampling, on the step's threads."""
        seqs: list[ScheduledSequence] = []
        logits: list[torch.Tensor] = []
        tables = {rid: state.block_ids for rid, state in self.requests.items()}
        pad = self.config.decode_context_pad if self.config.batch_invariant else 0
        forwards = [(output.rows, False)]  # the decode batch, if apart: one row of its own
        if output.decode_batch:
            forwards.append(((output.decode_batch,), True))
        for rows, decode_only in forwards:
            if not rows:
                continue
            backend = self.config.attention_backend
            inputs = step_inputs(
                rows, tables, self.kv_cache, backend, self.model.dtype, pad, self.decode.kernel
            )
            if self.lora is not None:
                slots = token_slots(rows, {r: s.lora_slot for r, s in self.requests.items()})
                tile_rows = self._tile_rows(decode_only) if self.tiles is not None else None
                self.lora.begin(slots, tile_rows)
            logits.append(self.forward(inputs, decode_only))
            seqs += [seq for row in rows for seq in row if seq.sample]
        if not seqs:
            return RunnerOutput(sampled_token_ids={}, logprobs={})
        states = [self.requests[seq.request_id] for seq in seqs]
        eos = self.config.eos_token_ids
        masks = [allowed.get(seq.request_id) for seq in seqs] if allowed else None
        tokens, logprobs = sample(  # the step's own logits, read no more: processed in place
            self._float_logits(logits),
            states,
            self.generator,
            eos_token_ids=eos,
            masks=masks,
            in_place=True,
            argmax=self.argmax,
        )
        for state, token in zip(states, tokens, strict=True):
            state.output_token_ids.append(token)
        return RunnerOutput(
            sampled_token_ids={seq.request_id: t for seq, t in zip(seqs, tokens, strict=True)},
            logprobs={
                s.request_id: lp for s, lp in zip(seqs, logprobs, strict=True) if lp is not None
            },
        )

    def _update_states(self, output: SchedulerOutput) -> None:
        """Apply a step's changes to the request states: drop the preempted and finished ones
        first (an id may end and be admitted anew in one step), add the admitted ones, extend
        the block tables."""
        for request_id in (*output.preempted_ids, *output.finished_ids):
            self.requests.pop(request_id, None)
        for new in output.new_requests:
            self.requests[new.request_id] = RequestState.of(new)
        for seq in output.segments:
            self.requests[seq.request_id].block_ids += seq.new_block_ids

    def load_lora(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter's weights into a pool slot (between steps); AdapterError if they do
        not fit this model."""
        if self.lora is None:
            raise ValueError("this runner has no LoRA pool (max_loras 0)")
        self.lora.write(slot, weights)

    def _tile_rows(self, decode_only: bool) -> int:
        """Batch-invariant tile height of a forward: by its phase, never its size."""
        return self.config.decode_tile_rows if decode_only else self.config.prefill_tile_rows

    def _float_logits(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """`parts` [n_i, V] stacked as float32 [sum n_i, V], in `logits_room`."""
        rows = sum(len(part) for part in parts)
        if self.logits_room.numel() < rows * parts[0].shape[1]:
            self.logits_room = torch.empty(rows * parts[0].shape[1], device=self.device)
        out = self.logits_room[: rows * parts[0].shape[1]].view(rows, -1)
        start = 0
        for part in parts:
            out[start : start + len(part)].copy_(part)
            start += len(part)
        return out

    def forward(self, inputs: ModelInputs, decode_only: bool = False) -> torch.Tensor:
        """Logits [num_sampled, V] at each sampling segment's last token; the lm head runs
        only there. In batch-invariant mode the tile height follows the forward's phase
        (`decode_only`), never its size."""
        if self.tiles is not None:
            self.tiles.rows = self._tile_rows(decode_only)
        hidden = self.model.get_decoder()(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            use_cache=False,
            packserve_meta=inputs.meta,
        ).last_hidden_state  # [R, L, hidden]
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs.sample_index)
        return self.model.get_output_embeddings()(last)  # [num_sampled, V]
