"""oneDNN-packed linear layers: same results as nn.Linear, every layer swapped, weights kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from packserve.kernels.linear import PackedLinear, can_pack, pack_linears, packs

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_nn_linear(bias, dtype):
    if not packs(dtype):
        pytest.skip(f"oneDNN does not pack {dtype} weights on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    with torch.inference_mode():
        for shape in [(1, 96), (7, 96), (3, 5, 96), (2, 1, 96)]:
            x = torch.randn(shape).to(dtype)
            torch.testing.assert_close(packed(x), linear(x), **tol)
        strided = torch.randn(5, 3, 96).to(dtype).transpose(0, 1)  # not contiguous
        torch.testing.assert_close(packed(strided), linear(strided), **tol)


def test_pack_linears_swaps_every_linear_of_a_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    before = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    params = {name: p for name, p in model.named_parameters()}
    ids = torch.tensor([[5, 17, 300, 42, 8]])
    with torch.inference_mode():
        expected = model(ids).logits
    assert can_pack(model)
    assert pack_linears(model, min_weight_elements=0) == len(before) > 0
    after = {name for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert after == before
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert dict(model.named_parameters()) == params  # the same parameters, still there
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
    assert pack_linears(model, min_weight_elements=0) == 0  # nothing left to swap


def test_small_layers_stay_unpacked(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if type(m) is nn.Linear}
    threshold = sorted(sizes.values())[len(sizes) // 2]  # about half are below it
    pack_linears(model, min_weight_elements=threshold)
    for name, module in model.named_modules():
        if name in sizes:
            assert isinstance(module, PackedLinear) == (sizes[name] >= threshold), name


def test_engine_packs_by_default_and_torch_keeps_nn_linear(make_engine):
    packed = make_engine().runner.model
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    plain = make_engine(linear_backend="torch").runner.model
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert any(type(m) is nn.Linear for m in plain.modules())


def test_onednn_asked_for_weights_it_cannot_pack_runs_and_reports_torch(make_engine):
    # oneDNN packs float32 and bfloat16 only (bfloat16 not on every CPU): float16 never.
    engine = make_engine(dtype="float16", linear_backend="onednn")
    assert (engine.runner.linear.backend, engine.runner.linear.source) == ("torch", "unpackable")
    assert not any(isinstance(m, PackedLinear) for m in engine.runner.model.modules())
