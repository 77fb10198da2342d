"""The C++ kernels' build (kernels/native.py) and RMSNorm through them (kernels/norms.py)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from packserve.kernels.native import STALE_LOCK_S, build_directory
from packserve.kernels.norms import (
    NORM_CLASSES,
    NativeRMSNorm,
    reference_rms_norm,
    swap_rms_norms,
)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)],
    ids=["float32", "bfloat16", "float16"],
)
@pytest.mark.parametrize("shape", [(1, 576), (3, 5, 256), (64, 1, 576), (17, 100)])
def test_rms_norm_equals_transformers_formula(kernels, dtype, tolerance, shape):
    """Any leading shape, hidden sizes on and off the vector width, each dtype: the kernel
    computes transformers' formula (mean square in float32, normalized rows rounded to the
    dtype, then times the weight) to the dtype's rounding; rows are independent."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (4 * torch.randn(shape, generator=g)).to(dtype)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    got = kernels.rms_norm(x, weight, 1e-5)
    want = reference_rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)
    first = kernels.rms_norm(x.reshape(-1, shape[-1])[:1], weight, 1e-5)
    assert torch.equal(first[0], got.reshape(-1, shape[-1])[0])  # same bits alone


def test_the_runner_swaps_the_models_norms_and_keeps_their_outputs(
    make_engine, reference_model, kernels
):
    """On a CPU every norm of the tiny (Llama-family) model runs the kernel with the norm's
    own weight and epsilon: each equals the untouched reference model's module at its place
    (the greedy tests see the whole model); batch-invariant mode keeps the model's own norms
    (it tiles them)."""
    engine = make_engine(decode_attention="sdpa", linear_backend="torch")
    swapped = {name: m for name, m in engine.model.named_modules() if isinstance(m, NativeRMSNorm)}
    assert (
        engine.runner.native_norms
        == len(swapped)
        == 2 * reference_model.config.num_hidden_layers + 1
    )
    assert not any(type(m).__name__ in NORM_CLASSES for m in engine.model.modules())
    originals = dict(reference_model.named_modules())
    x = torch.randn(
        6, reference_model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        for name, norm in swapped.items():
            torch.testing.assert_close(norm(x), originals[name](x), atol=1e-5, rtol=1e-5)
    invariant = make_engine(batch_invariant=True, linear_backend="torch")
    assert invariant.runner.native_norms == 0
    assert not any(isinstance(m, NativeRMSNorm) for m in invariant.model.modules())


def test_a_norm_the_kernel_does_not_reproduce_keeps_its_forward(kernels):
    """A module under a known name computing something else (here: Gemma's 1 + weight) is
    left as it is."""

    class LlamaRMSNorm(torch.nn.Module):  # noqa: N801 - the name transformers uses
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return reference_rms_norm(x, 1 + self.weight, self.variance_epsilon)

    model = torch.nn.Sequential(LlamaRMSNorm())
    assert swap_rms_norms(model, kernels.rms_norm) == 0
    assert type(model[0]).__name__ == "LlamaRMSNorm"


def test_a_lock_left_by_a_killed_build_is_removed_a_live_one_kept(tmp_path, monkeypatch):
    """torch's builder waits for its lock file to go away, forever: a lock older than any
    build would hang every later start, so it goes; a recent one (a build under way in
    another process) stays."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = build_directory("stale")
    assert folder.is_dir() and folder.is_relative_to(tmp_path)
    lock = folder / "lock"
    lock.touch()
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert build_directory("stale") == folder and not lock.exists()
    lock.touch()
    assert build_directory("stale") == folder and lock.exists()


def _argmax_rows() -> list[torch.Tensor]:
    """Rows that take each of the kernel's paths: widths on and off the vector width, ties
    (the first maximum wins), NaNs (the first NaN wins, as torch counts NaN above all), -inf
    and signed zeros."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(width, generator=g) for width in (1, 7, 16, 17, 100, 1000, 49152)]
    tie = torch.randn(1000, generator=g)
    tie[[40, 700, 999]] = tie.max() + 1
    late_tie = torch.full((300,), -1.0)
    late_tie[[250, 299]] = 2.0
    nan = torch.randn(1000, generator=g)
    nan[[500, 900]] = float("nan")
    nan[10] = float("inf")
    first_nan = torch.randn(33, generator=g)
    first_nan[0] = float("nan")
    masked = torch.full((70,), float("-inf"))
    zeros = torch.tensor([-1.0, -0.0, 0.0, -0.0])
    return [*rows, tie, late_tie, nan, first_nan, masked, zeros]


def test_row_argmax_is_torch_argmax(kernels):
    for row in _argmax_rows():
        assert kernels.row_argmax(row.view(1, -1)).tolist() == [int(row.argmax())], row[:8]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2000, generator=g)
    x[5, 17] = float("nan")
    x[9, [3, 1500]] = 50.0  # a tie
    got = kernels.row_argmax(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
    assert torch.equal(kernels.row_argmax(x.t().contiguous().t()), got)  # a strided view too
    with pytest.raises(RuntimeError, match="float32"):
        kernels.row_argmax(x.to(torch.bfloat16))
