"""The kernels' options by name, importable without torch (the CLI's flags list them)."""

from __future__ import annotations

from typing import Literal

AttentionBackend = Literal["dense", "varlen"]  # block-diagonal masked SDPA, or per segment
LinearBackend = Literal["onednn", "torch"]  # prepacked weights (CPU), or the model's nn.Linear
Dtype = Literal["float32", "bfloat16", "float16"]
