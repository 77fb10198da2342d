"""Model families beyond Llama load through the same path and stay exact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from packserve.engine.engine import Engine, EngineConfig
from packserve.models.model_maker import make_model
from packserve.scheduler import SamplingParams


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_family_greedy_equals_generate(tmp_path, family, mixed_workload, greedy_reference):
    reference_greedy, assert_matches = greedy_reference
    path = make_model(tmp_path / family, size="tiny", seed=3, family=family)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(EngineConfig(model=str(path), dtype="float32"))
    prompts = [p for p, _, _ in mixed_workload[:8]]
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = reference_greedy(reference, prompt, 12)
        assert_matches(list(out.token_ids), expected, f"{family}, prompt of {len(prompt)} tokens")
