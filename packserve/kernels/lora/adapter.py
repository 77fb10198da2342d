"""Reading a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) without
peft: each target projection's A [r, in] and B [out, r] and its scaling.

Supported: LoRA on the decoder's attention and MLP projections (q/k/v/o, gate/up/down), one
rank and alpha for the whole adapter (or per module through `rank_pattern` / `alpha_pattern`
keyed by the module's short name), rsLoRA scaling. Refused with a message: DoRA, biases,
`modules_to_save`, other targets (embeddings, the LM head), ranks above the pool's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections an adapter may target, by their names in Llama-style decoders.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    """An adapter folder that cannot be served: missing files, an unsupported kind of LoRA, a
    rank above --max-lora-rank, a module the model does not have."""


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """What adapter_config.json says, checked; read in the request path (cheap)."""

    rank: int  # r: the largest rank of any module
    lora_alpha: float
    use_rslora: bool  # scaling alpha / sqrt(r) instead of alpha / r
    rank_pattern: dict[str, int]  # module short name -> its own rank
    alpha_pattern: dict[str, float]  # module short name -> its own alpha

    def scaling(self, module: str, rank: int) -> float:
        """The factor on B @ A for `module` (a full name) of rank `rank`."""
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """One adapter read into memory (float32, on the CPU): what the pool copies into a slot."""

    # module name as the model names it (e.g. "model.layers.0.self_attn.q_proj") ->
    # (A [r, in], B [out, r] already multiplied by its scaling)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)


def read_adapter_config(path: str | Path, max_rank: int) -> AdapterConfig:
    """Check an adapter folder and read its config; raises AdapterError naming what is wrong."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"{folder} holds no {CONFIG_FILE}: not a PEFT adapter folder")
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{folder} holds no {WEIGHTS_FILE} (only safetensors are read)")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{folder / CONFIG_FILE}: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{folder / CONFIG_FILE} is not a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{folder}: only LoRA adapters are served, not {peft_type}")
    if raw.get("use_dora"):
        raise AdapterError(f"{folder}: DoRA adapters are not supported")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{folder}: adapters with trained biases are not supported")
    if raw.get("modules_to_save"):
        raise AdapterError(f"{folder}: adapters with modules_to_save are not supported")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    unknown = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in TARGET_MODULES)
    if unknown:
        raise AdapterError(
            f"{folder}: LoRA on {', '.join(unknown)} is not supported (targets: "
            f"{', '.join(TARGET_MODULES)})"
        )
    try:
        rank_pattern = {str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()}
        config = AdapterConfig(
            rank=max([int(raw["r"]), *rank_pattern.values()]),
            lora_alpha=float(raw.get("lora_alpha") or raw["r"]),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{folder / CONFIG_FILE}: bad rank or alpha ({exc})") from None
    if config.rank < 1:
        raise AdapterError(f"{folder}: rank {config.rank} must be positive")
    if config.rank > max_rank:
        raise AdapterError(
            f"{folder}: rank {config.rank} is above --max-lora-rank {max_rank}; restart with "
            f"--max-lora-rank {config.rank} or more"
        )
    return config


def read_adapter(path: str | Path, max_rank: int) -> LoRAWeights:
    """Read an adapter's weights (on a worker thread: this reads the disk)."""
    folder = Path(path)
    config = read_adapter_config(folder, max_rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  # safe_open is not iterable
                module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
                if kind not in ("A.weight", "B.weight"):
                    raise AdapterError(f"{folder}: unexpected tensor {key!r}")
                pairs.setdefault(module, {})[kind[0]] = f.get_tensor(key).float()
    except (OSError, RuntimeError) as exc:
        raise AdapterError(f"{folder / WEIGHTS_FILE}: {exc}") from None
    modules = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{folder}: {module} lacks its lora_A or lora_B")
        a, b = pair["A"], pair["B"]  # [r, in], [out, r]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise AdapterError(f"{folder}: {module} has mismatched A {a.shape} and B {b.shape}")
        if rank > max_rank:
            raise AdapterError(f"{folder}: {module} has rank {rank} > --max-lora-rank {max_rank}")
        modules[module] = (a, b * config.scaling(module, rank))
    return LoRAWeights(modules)
