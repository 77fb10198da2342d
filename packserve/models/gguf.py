"""Turn a GGUF file (llama.cpp's format) into a normal Hugging Face model folder.

transformers reads GGUF itself (through the ``gguf`` package), but a model loaded that way
carries a GGUF quantization config and refuses ``save_pretrained``; it also parses the whole
file again on every load (~20 s for a 135M model). So a ``.gguf`` is converted once into a
folder of float32 safetensors (dequantized), config, generation config and tokenizer
(including the chat template), and that folder is what packserve loads.

Cache key: the file's sha256 (content-addressed, so a renamed or copied file reuses the
folder and a file rewritten in place gets a new one) plus ``FORMAT_VERSION``. Hashing costs
~0.3 s per 100 MB on every load; that is small next to loading the float32 weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .model_maker import cache_root, write_dir_atomically

# Bump whenever the output of convert_gguf changes, so stale cached folders are not reused.
FORMAT_VERSION = 1

# GGUF metadata keys of the tokens that end a turn, besides the end of sequence: llama.cpp
# stops on any of them, so the converted generation config lists them all.
END_TOKEN_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",  # end of turn (e.g. Llama 3's <|eot_id|>)
    "tokenizer.ggml.eom_token_id",  # end of message (tool calls)
)


def progress(message: str) -> None:
    """One progress line (model fetching and conversion are slow, once): a log record, so
    the server's log format applies; the CLI shows INFO records on stderr."""
    logging.getLogger("packserve.models").info(message)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's contents, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(gguf_path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != GGUFValueType.ARRAY:
            meta[key] = field.contents()
    return meta


def _end_token_ids(meta: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for key in END_TOKEN_KEYS:
        value = meta.get(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _write_folder(gguf_path: Path, out: Path) -> None:
    """Write the converted model, generation config and tokenizer of ``gguf_path`` to ``out``."""
    meta = gguf_metadata(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name

    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF loader records itself as a quantization; the rebuilt model is plain float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # Every weight is overwritten below, so the random init only needs to leave the global
    # RNG untouched (fork_rng); from_config cannot skip it.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    end_ids = _end_token_ids(meta) or [tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", config.bos_token_id),
        eos_token_id=end_ids[0] if len(end_ids) == 1 else end_ids,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", config.pad_token_id),
    )
    model.eval().save_pretrained(out, safe_serialization=True)

    if not tokenizer.chat_template and meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    # The GGUF tokenizer has no length limit of its own; the model's context is the one.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write ``gguf_path`` as a Hugging Face folder at ``out_dir``: config.json,
    model.safetensors (float32, dequantized), generation_config.json (stops at the GGUF's
    end-of-sequence and end-of-turn tokens), tokenizer files and the chat template.

    Deterministic (the same file gives byte-identical output) and atomic (built in a
    temporary sibling folder, then renamed). Raises ``FileExistsError`` if ``out_dir``
    exists and is not empty, ``FileNotFoundError`` if ``gguf_path`` does not exist.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    return write_dir_atomically(Path(out_dir), lambda tmp: _write_folder(gguf_path, tmp))


def gguf_model_dir(gguf_path: Path) -> Path:
    """Return the cached converted folder of ``gguf_path``, converting it on first use.

    The folder is ``<cache_root>/gguf-<stem>-<sha256[:16]>-v<FORMAT_VERSION>``. Safe under
    concurrent callers: the loser of the rename race returns the winner's identical folder.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    digest = sha256_file(gguf_path)
    path = cache_root() / f"gguf-{gguf_path.stem}-{digest[:16]}-v{FORMAT_VERSION}"
    if not (path / "config.json").is_file():
        convert_once(gguf_path, path)
        progress(f"ready: {path}")
    return path


def convert_once(gguf_path: Path, path: Path) -> None:
    """`convert_gguf` into the cache folder `path`, unless a concurrent caller did first."""
    progress(f"converting {gguf_path.name} to a float32 Hugging Face folder ...")
    try:
        convert_gguf(gguf_path, path)
    except FileExistsError:
        if not (path / "config.json").is_file():
            raise
