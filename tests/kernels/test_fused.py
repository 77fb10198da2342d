"""Sibling projections on one stacked GEMM: the model's outputs unchanged (up to GEMM rounding),
each member's columns whatever the call order or input, nothing held once all have read."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from packserve.kernels import fused
from packserve.kernels.fused import ProjectionSlice, SharedInputProjection, fuse_shared_inputs


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
def test_fused_model_gives_the_same_logits(tiny_model_dir, monkeypatch, pack):
    if pack:
        if not torch.backends.mkldnn.is_available():
            pytest.skip("torch built without oneDNN")
        monkeypatch.setattr(fused, "MIN_WEIGHT_ELEMENTS", 0)  # the tiny model's GEMMs too
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 42, 8], [9, 9, 1, 2, 3]])
    with torch.inference_mode():
        expected = model(ids).logits
        shared = fuse_shared_inputs(model.get_decoder(), pack)
        got = model(ids).logits
    layers = model.config.num_hidden_layers
    assert len(shared) == 2 * layers  # q/k/v and gate/up of every layer
    assert all((s.packed is not None) == pack for s in shared)
    slices = [m for m in model.modules() if isinstance(m, ProjectionSlice)]
    assert len(slices) == 5 * layers
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert all(s._output is None for s in shared)  # every member read: nothing held


def test_members_get_their_columns_in_any_order_and_on_any_input():
    torch.manual_seed(0)
    parent = torch.nn.Module()
    parent.gate_proj = torch.nn.Linear(12, 20, bias=True, dtype=torch.float64)
    parent.up_proj = torch.nn.Linear(12, 7, bias=False, dtype=torch.float64)
    gate, up = parent.gate_proj, parent.up_proj
    (shared,) = fuse_shared_inputs(parent, pack=False)
    assert isinstance(shared, SharedInputProjection) and shared.width == 27
    x, other = torch.randn(3, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(parent.up_proj(x), up(x))  # out of order: up first
    torch.testing.assert_close(parent.up_proj(other), up(other))  # another input: recomputed
    torch.testing.assert_close(parent.gate_proj(other), gate(other))
    assert shared._output is None  # both read `other`'s output
    torch.testing.assert_close(parent.gate_proj(x), gate(x))
    shared.set_extra(torch.randn(4, 12, dtype=torch.float64))  # extra columns stay apart
    torch.testing.assert_close(parent.gate_proj(x), gate(x))
    torch.testing.assert_close(parent.up_proj(x), up(x))


def test_engine_fuses_except_in_batch_invariant_mode(make_engine):
    def slices(engine) -> int:
        return sum(isinstance(m, ProjectionSlice) for m in engine.runner.model.modules())

    assert slices(make_engine()) > 0
    assert slices(make_engine(batch_invariant=True)) == 0
