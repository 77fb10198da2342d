"""Tests for the offline default model builder (real models, no mocks)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from packserve.models.corpus import corpus_documents
from packserve.models.model_maker import (
    FAMILIES,
    build_config,
    default_model_dir,
    make_model,
)


def _hashes(folder: Path) -> dict[str, str]:
    """Map every file name in ``folder`` to the sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama model, seed 0, built once for the whole module."""
    return make_model(tmp_path_factory.mktemp("tiny") / "model", size="tiny", seed=0)


# Content digests of `packserve make-model DIR --size tiny` (seed 0): the same on every
# machine. JSON files are compared without transformers' version stamp and in canonical
# form, so a library upgrade that only reformats them does not count; the weights and the
# chat template are compared byte for byte. Changing the model maker changes these (and
# FORMAT_VERSION).
TINY_DIGESTS = {
    "chat_template.jinja": "38bb67e2f0929d5ce4113f3e41611752cd41b144c0292b0e3e0133b0359e2a71",
    "config.json": "892cd8d2f8c2f283cff5612b525e6f33972aa2b8fcecc56fd8f11fd44062ea52",
    "generation_config.json": "d202fee30014d5fa5eecf91047cce4059b58e79c29c8e78bffa710567d818ce8",
    "model.safetensors": "8d25b103953fbca7a677db8b15bf7a6f177a14ce702862fd742e6d8d2220495e",
    "tokenizer.json": "3245f8a14c4039c4dc17e4f7c1910008e3b2b502bc92b9b7e36973ed50b49be9",
    "tokenizer_config.json": "11abee7e00df6297c9d6216957936f24a1de6ea863420b574a0413d57d65fd6c",
}


def _content_digests(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".json":
            content = json.loads(data)
            content.pop("transformers_version", None)
            data = json.dumps(content, sort_keys=True).encode()
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


@pytest.mark.slow
def test_make_model_tiny_is_the_same_on_every_machine(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    cli = Path(sys.executable).with_name("packserve")
    subprocess.run([str(cli), "make-model", str(out), "--size", "tiny"], check=True)
    assert _content_digests(out) == TINY_DIGESTS


def test_corpus_ships_with_the_code() -> None:
    docs = corpus_documents()
    assert len(docs) == 24 and docs == corpus_documents()
    assert 100_000 < sum(len(d.encode("utf-8")) for d in docs) < 250_000


def test_folder_contents(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert "tokenizer.json" in names
    # No leftover temporary build folder next to the output.
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]


@pytest.mark.slow
def test_same_seed_is_byte_identical_across_processes(tiny_dir: Path, tmp_path: Path) -> None:
    # A fresh process retrains the tokenizer and reseeds torch from scratch, which also
    # catches per-process hash randomisation (Python and Rust) leaking into the output.
    other = tmp_path / "again"
    code = "import sys; from pathlib import Path; "
    code += "from packserve.models.model_maker import make_model; make_model(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(other)], check=True, capture_output=True)
    assert _hashes(other) == _hashes(tiny_dir)


def test_different_seed_gives_different_weights(tiny_dir: Path, tmp_path: Path) -> None:
    other = make_model(tmp_path / "seed1", size="tiny", seed=1)
    a = load_file(tiny_dir / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    # The tokenizer does not depend on the seed.
    assert _hashes(other)["tokenizer.json"] == _hashes(tiny_dir)["tokenizer.json"]


def test_loads_and_generates(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2).values
    assert float(top2[0] - top2[1]) > 1e-4  # logits are spread, not near-tied
    assert out.shape[1] == ids.shape[1] + 32  # no early EOS on this prompt


def test_param_counts() -> None:
    counts = {}
    for size in ("tiny", "bench"):
        with torch.device("meta"):  # shapes only: the bench preset is never materialised
            model = AutoModelForCausalLM.from_config(build_config(size))
        counts[size] = model.num_parameters()
    assert 3_000_000 <= counts["tiny"] <= 6_000_000
    assert 80_000_000 <= counts["bench"] <= 120_000_000


def test_tokenizer_round_trip(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Return the value.  Indented\n\tcode() and ünïcödé 日本語!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == 8192


def test_chat_template(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n"
        "<|assistant|>\nHello!<|eos|>\n<|user|>\nBye<|eos|>\n<|assistant|>\n"
    )
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert isinstance(no_prompt, str) and text == no_prompt + "<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_builds_and_runs(family: str, tmp_path: Path) -> None:
    out = make_model(tmp_path / family, size="tiny", seed=0, family=family)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == family
    assert model.config.head_dim == 32
    with torch.no_grad():
        logits = model(torch.tensor([[0, 100, 200, 300]])).logits
    assert logits.shape == (1, 4, 8192)
    assert torch.isfinite(logits).all()


def test_refuses_to_overwrite(tiny_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        make_model(tiny_dir)


def test_default_model_dir_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path / "cache"))
    first = default_model_dir()
    assert first.parent == tmp_path / "cache"
    assert "tiny" in first.name and "llama" in first.name and "seed0" in first.name
    weights = (first / "model.safetensors").stat()
    second = default_model_dir()
    assert second == first
    again = (second / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]
