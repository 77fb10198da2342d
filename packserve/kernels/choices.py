"""The kernels' options by name, importable without torch (the CLI's flags list them)."""

from __future__ import annotations

from typing import Literal

AttentionBackend = Literal["dense", "varlen"]  # block-diagonal masked SDPA, or per segment
LinearBackend = Literal["onednn", "torch"]  # prepacked weights (CPU), or the model's nn.Linear
# "auto": the faster of the two for this model's shapes on this machine (kernels/autotune.py)
LinearBackendChoice = Literal["auto", "onednn", "torch"]
# Decode attention over a bucket of gathered contexts: torch's fused SDPA kernel, or two batched
# matmuls with a float32 softmax
BucketKernel = Literal["sdpa", "matmul"]
# ... or, on a CPU, a compiled kernel that reads the paged pool in place (kernels/native.py).
# "auto": the fastest here, timed at start-up (kernels/autotune.py)
DecodeKernel = Literal["sdpa", "matmul", "paged"]
DecodeKernelChoice = Literal["auto", "sdpa", "matmul", "paged"]
Dtype = Literal["float32", "bfloat16", "float16"]
# "auto": bfloat16 where the device computes it natively, else float32 (kernels/machine.py)
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
# Weight-only quantization of the decoder's linear layers (kernels/quant.py)
Quantization = Literal["none", "int8", "int4"]
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
