"""Load a Hugging Face causal LM and its tokenizer, wired to the packserve attention."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .attention import ATTENTION_NAME

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local folder, a hub id or a ``.gguf`` file, through transformers' Auto classes, in
    eval mode. A ``.gguf`` file is converted once into a cached float32 folder (see
    ``gguf.py``) and loaded from there."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    if str(name_or_path).lower().endswith(".gguf") and not Path(name_or_path).is_dir():
        from .gguf import gguf_model_dir

        name_or_path = str(gguf_model_dir(Path(name_or_path)))
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=DTYPES[dtype],
        attn_implementation=ATTENTION_NAME,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model.to(torch.device(device))  # type: ignore[arg-type]  # the stub wraps .to oddly
    model.eval()
    return model, tokenizer
