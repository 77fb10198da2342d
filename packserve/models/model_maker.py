"""Build small, deterministic, random-weight Hugging Face models that work fully offline.

No hub download is possible, so fast tests and benchmarks use models built here. Weights
are random (seeded, drawn as integers and scaled exactly, so no CPU's vectorized random
normal or rounding enters) and the tokenizer is a byte-level BPE trained on the corpus that
ships in the repository (see ``corpus.py``), so the same ``(size, seed, family)`` yields
byte-identical files on every machine.

Tokenization convention: ``tokenizer(text)`` prepends ``<|bos|>``. The chat template also
starts with ``<|bos|>``, so a rendered chat prompt must be encoded with
``add_special_tokens=False`` (what ``apply_chat_template(tokenize=True)`` does).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from .corpus import corpus_documents

# Bump whenever the output of make_model changes, so stale cached models are not reused.
FORMAT_VERSION = 2

# Std of the random init. The HF default 0.02 leaves the logits nearly tied (median
# top1-top2 gap ~0.05 on tiny); 0.1 gives a median gap ~0.28 (tiny) / ~0.48 (bench) against
# ~1e-5 float32 noise between computation orders (full vs. chunked-with-KV-cache forward),
# so greedy outputs compare token for token. Larger values grow the noise faster than the
# gap. Measured: greedy decoding almost never emits EOS early, so no EOS damping is needed.
INITIALIZER_RANGE = 0.1

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ModelSize:
    """Dimensions of a model preset (shared by every family)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool


MODEL_SIZES: dict[str, ModelSize] = {
    # ~5.0M params: fast enough to build and run in every unit test.
    "tiny": ModelSize(8192, 256, 4, 8, 4, 688, 2048, tie_word_embeddings=True),
    # ~88M params: big enough that kernels and batching dominate benchmark timings.
    "bench": ModelSize(8192, 768, 12, 12, 4, 2048, 2048, tie_word_embeddings=False),
}

FAMILIES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def build_config(size: str = "tiny", family: str = "llama") -> PretrainedConfig:
    """Return the transformers config of preset ``size`` for architecture ``family``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    s = MODEL_SIZES[size]
    kwargs: dict[str, Any] = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        # Explicit because Qwen3Config defaults head_dim to 128 regardless of hidden size.
        head_dim=s.hidden_size // s.num_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=s.tie_word_embeddings,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
    )
    if family == "mistral":
        kwargs["sliding_window"] = None  # full attention, like the other families
    return FAMILIES[family](**kwargs)


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process per vocab size (it only depends on that)."""
    tok = Tokenizer(models.BPE())
    # No prefix space, so decode(encode(text)) reproduces text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..5 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_documents(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))],
    )
    return tok.to_str()


def build_tokenizer(size: str = "tiny") -> PreTrainedTokenizerFast:
    """Return the trained byte-level BPE tokenizer of preset ``size``, wrapped for transformers."""
    s = MODEL_SIZES[size]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(s.vocab_size)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=s.max_position_embeddings,
    )


def build_model(size: str = "tiny", seed: int = 0, family: str = "llama") -> PreTrainedModel:
    """Return the seeded random-weight float32 model, without touching the disk.

    Every matrix is uniform with standard deviation INITIALIZER_RANGE: integers from torch's
    seeded generator (exact on any CPU) times one constant (one IEEE rounding). Vectors keep
    transformers' init (norm weights 1, biases 0)."""
    config = build_config(size, family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    scale = INITIALIZER_RANGE * 3**0.5 / 2**23  # uniform on [-a, a] has std a / sqrt(3)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):  # tied weights listed once
            if param.dim() >= 2:
                ints = torch.randint(-(2**23), 2**23, param.shape, generator=generator)
                param.copy_(ints.to(torch.float32) * scale)  # ints below 2^24: exact floats
    return model.eval()


def make_model(out_dir: Path, size: str = "tiny", seed: int = 0, family: str = "llama") -> Path:
    """Write a Hugging Face model folder for ``(size, seed, family)`` to ``out_dir``.

    Built in a temporary sibling folder and renamed into place, so readers never see a
    partial folder. Raises ``FileExistsError`` if ``out_dir`` exists and is not empty.
    """

    def build(tmp: Path) -> None:
        build_model(size, seed, family).save_pretrained(tmp, safe_serialization=True)
        build_tokenizer(size).save_pretrained(tmp)

    return write_dir_atomically(out_dir, build)


def write_dir_atomically(out_dir: Path, build: Callable[[Path], object]) -> Path:
    """Run ``build(tmp)`` on a fresh temporary sibling folder of ``out_dir``, then rename it
    to ``out_dir``, so readers never see a partial folder; files end up world-readable.

    Raises ``FileExistsError`` if ``out_dir`` exists and is not empty (also when another
    process renamed its own copy into place first). The temporary folder never outlives
    the call.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build(tmp)
        # mkdtemp (0o700) and safetensors (0o600) are private; the cache may be shared.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        try:
            os.rename(tmp, out_dir)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{out_dir} was created concurrently") from exc
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return out_dir


def cache_root() -> Path:
    """Return the model cache root: ``$PACKSERVE_CACHE_DIR`` or ``~/.cache/packserve/models``."""
    env = os.environ.get("PACKSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "packserve" / "models"


def default_model_dir(size: str = "tiny", seed: int = 0) -> Path:
    """Return the folder of the built-in llama model, building it on first use.

    Safe under concurrent callers: each builds privately and renames atomically; a loser
    of the race discards its copy and returns the winner's identical folder.
    """
    path = cache_root() / f"{size}-llama-seed{seed}-v{FORMAT_VERSION}"
    if not (path / "config.json").is_file():
        try:
            make_model(path, size=size, seed=seed, family="llama")
        except FileExistsError:
            if not (path / "config.json").is_file():
                raise
    return path
