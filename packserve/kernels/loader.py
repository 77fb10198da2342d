"""Load a Hugging Face causal LM and its tokenizer, wired to the packserve attention."""

from __future__ import annotations

from typing import get_args

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .attention import ATTENTION_NAME
from .choices import Dtype

DTYPES = {name: getattr(torch, name) for name in get_args(Dtype)}


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local folder or a hub id, through transformers' Auto classes, in eval mode
    (``packserve.models.resolve_model`` turns a ``.gguf`` file into such a folder)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=DTYPES[dtype],
        attn_implementation=ATTENTION_NAME,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model.to(torch.device(device))  # type: ignore[arg-type]  # the stub wraps .to oddly
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer (a server whose engine runs in another process loads its own)."""
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
