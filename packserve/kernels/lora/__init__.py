"""Serving many LoRA adapters over one base model: reading PEFT folders (`adapter`), the weight
pool and the batched per-token update (`layers`)."""

from .adapter import AdapterConfig, AdapterError, LoRAWeights, read_adapter, read_adapter_config
from .layers import LoRALinear, LoRAPool, LoRAStep, token_slots

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "LoRALinear",
    "LoRAPool",
    "LoRAStep",
    "LoRAWeights",
    "read_adapter",
    "read_adapter_config",
    "token_slots",
]
