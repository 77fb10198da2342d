"""The C++ int8 linear (kernels/csrc/int8_linear.cpp) and Int8Linear on it:

- it computes x @ (q * scale)^T to float32's rounding, for any rows, odd input sizes and
  output sizes off its channel block, float32 and bfloat16 activations;
- a row's output has the same bits alone, in a batch, and on one or two threads;
- Int8Linear on it agrees with Int8Linear on torch's op, below and above the row count where
  it hands over to the dequantized GEMM; the engine's int8 layers use it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from packserve.kernels.quant import DEQUANTIZE_FROM_ROWS, Int8Linear, quantize_int8

UNIT = 2.0**-24  # float32's unit roundoff
BF16_UNIT = 2.0**-8  # bfloat16's, rounding the output (with room: the scale rounds too)


@pytest.fixture(scope="module")
def kernel(kernels):
    return kernels.int8_linear


@pytest.fixture
def threads():
    """Set the intra-op thread count inside a test, restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _problem(rows: int, out_features: int, in_features: int, dtype: torch.dtype, seed: int = 0):
    """x [rows, in] in `dtype`, q [out, in] int8 over the whole range, scale [out] in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    q = torch.randint(-128, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_features, generator=g) / 64 + 1e-3).to(dtype)
    return x, q, scale


def _bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(reference [M, N] float64, the largest error float32 sums of K products may make, plus
    the output's rounding to `dtype`)."""
    w = q.double() * scale.double()[:, None]  # [N, K]
    reference = x.double() @ w.T
    magnitude = x.double().abs() @ w.abs().T
    bound = (x.shape[1] + 2) * UNIT * magnitude
    if dtype == torch.bfloat16:
        bound += BF16_UNIT * reference.abs()
    return reference, bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "shape",
    [(1, 7, 100), (1, 576, 576), (17, 13, 577), (5, 192, 576), (3, 9, 32), (64, 30, 1536)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_the_kernel_computes_the_dequantized_product(kernel, dtype, shape):
    """M x N x K: one row and many, K on and off the kernel's group of 32 (or 64) inputs, N
    on and off its block of 4 channels."""
    x, q, scale = _problem(*shape, dtype)
    got = kernel(x, q, scale)
    assert got.shape == (shape[0], shape[1]) and got.dtype == dtype
    reference, bound = _bound(x, q, scale, dtype)
    error = (got.double() - reference).abs()
    assert (error <= bound).all(), (error / bound).max()


def test_a_float32_scale_serves_bfloat16_activations(kernel):
    x, q, scale = _problem(4, 10, 64, torch.bfloat16)
    assert torch.equal(kernel(x, q, scale.float()), kernel(x, q, scale))  # bf16 widens exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_rows_output_has_the_same_bits_alone_in_a_batch_and_on_any_thread_count(
    kernel, threads, dtype
):
    """Enough channels that one row alone splits over two threads; a batch of 17 puts the
    row in every position of a row tile and next to a tail tile."""
    x, q, scale = _problem(17, 1001, 577, dtype)
    threads(1)
    batch = kernel(x, q, scale)
    for i in range(len(x)):
        alone = kernel(x[i : i + 1], q, scale)
        assert torch.equal(alone[0], batch[i]), i
    threads(2)
    assert torch.equal(kernel(x, q, scale), batch)
    assert torch.equal(kernel(x[5:6], q, scale)[0], batch[5])
    assert torch.equal(kernel(x[3:12], q, scale), batch[3:12])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 9, DEQUANTIZE_FROM_ROWS + 5])
@torch.inference_mode()
def test_int8_linear_on_the_kernel_matches_it_on_torchs_op(kernel, dtype, rows):
    """Same weights, same scale: both compute (x @ q^T) * scale, the kernel's path or (from
    DEQUANTIZE_FROM_ROWS rows, where the dtype's GEMM is native) the dequantized GEMM's.
    (torch's op crashes on some input sizes, 300 among them: 320 here.)"""
    g = torch.Generator().manual_seed(rows)
    layer = nn.Linear(320, 70, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(70, 320, generator=g) / 20)
        layer.bias.copy_(torch.linspace(-1, 1, 70))
    layer = layer.to(dtype)
    native, torch_op = Int8Linear(layer, kernel), Int8Linear(layer, None)
    assert native.kernel is kernel and torch_op.kernel is None
    x = torch.randn(rows, 320, generator=g).to(dtype)
    got, expected = native(x), torch_op(x)
    assert got.shape == expected.shape == (rows, 70) and got.dtype == dtype
    q, scale = quantize_int8(layer.weight, dtype)
    reference, bound = _bound(x, q, scale, dtype)
    reference += layer.bias.double()
    if dtype == torch.bfloat16:  # the bias is added in bfloat16 too: one more rounding
        bound += BF16_UNIT * reference.abs()
    for out in (got, expected):
        error = (out.double() - reference).abs()
        assert (error <= 2 * bound).all(), (error / bound).max()


def test_the_engines_int8_layers_run_the_kernel(make_engine, kernel):
    engine = make_engine(dtype="bfloat16", quantization="int8", linear_backend="torch")
    layers = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.kernel is kernel for m in layers)
