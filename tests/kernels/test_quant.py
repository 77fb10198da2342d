"""Per-machine kernel choices and weight-only quantization, on the real tiny model:

- int8 / int4 linear layers stay within their quantization step of the float layer;
- engines with --quantization int8 / int4 generate, deterministically, with an int8 LM head;
  int4 leaves the layers its kernel cannot hold unquantized and says which;
- --dtype auto follows the CPU's bf16 flags; --linear-backend auto and --decode-attention auto
  are timed once, cached, and read back by the next start.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from packserve.engine.engine import EngineConfig
from packserve.kernels.linear import packs
from packserve.kernels.machine import resolve_dtype
from packserve.kernels.native import build as build_native
from packserve.kernels.quant import Int4Linear, Int8Linear, int8_kernel, quantize_linears
from packserve.scheduler import SamplingParams

# The float32 GEMM's own rounding, relative to sum |x| |w| (far below a quantization step).
F32_SLACK = 1e-5


def _layer(reference_model, name: str) -> nn.Linear:
    """A copy of one of the tiny model's float32 linear layers, with a bias added (the
    quantized forward adds it apart)."""
    source = reference_model.get_submodule(name)
    layer = nn.Linear(source.in_features, source.out_features, bias=True)
    with torch.no_grad():
        layer.weight.copy_(source.weight)
        layer.bias.copy_(torch.linspace(-1, 1, source.out_features))
    return layer


def _inputs(in_features: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, in_features, generator=generator)  # [R, L, in]


@torch.inference_mode()
def test_int8_linear_is_within_half_a_step_per_weight(reference_model):
    layer = _layer(reference_model, "model.layers.0.mlp.gate_proj")
    quantized = Int8Linear(layer, int8_kernel())  # the engine's: C++ where it builds
    x = _inputs(layer.in_features)
    got, expected = quantized(x), layer(x)
    assert got.shape == expected.shape
    # |w - q * scale| <= scale / 2 for every weight of output n, so the output moves by at
    # most scale[n] / 2 * sum_k |x_k|.
    abs_x = x.abs().reshape(-1, layer.in_features)  # [M, in]
    bound = 0.5 * abs_x.sum(-1, keepdim=True) * quantized.scale.float()[None]  # [M, out]
    bound += F32_SLACK * abs_x @ layer.weight.abs().T
    error = (got - expected).abs().reshape(bound.shape)
    assert (error <= bound).all(), (error / bound).max()
    assert quantized.weight_int8.dtype == torch.int8


@pytest.mark.parametrize("group_size", [32, 64, 128])
@torch.inference_mode()
def test_int4_linear_is_within_half_a_step_per_group(reference_model, group_size):
    layer = _layer(reference_model, "model.layers.1.self_attn.q_proj")
    quantized = Int4Linear(layer, group_size)
    x = _inputs(layer.in_features)
    got, expected = quantized(x), layer(x)
    # Each group g of output n has its own step scale[g, n]: the output moves by at most
    # sum_g scale[g, n] / 2 * sum_{k in g} |x_k|.
    abs_x = x.abs().reshape(-1, layer.in_features)  # [M, in]
    x_per_group = abs_x.reshape(abs_x.shape[0], -1, group_size).sum(-1)  # [M, groups]
    scale = quantized.scale_and_zero[..., 0].float()  # [groups, out]
    bound = 0.5 * x_per_group @ scale + F32_SLACK * abs_x @ layer.weight.abs().T  # [M, out]
    error = (got - expected).abs().reshape(bound.shape)
    assert (error <= bound).all(), (error / bound).max()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_engine_generates_the_same_tokens_twice(make_engine, quantization):
    engine = make_engine(dtype="bfloat16", quantization=quantization)
    assert engine.info.quantization == quantization and engine.info.dtype == "bfloat16"
    decoder = engine.model.get_decoder()
    quantized = (Int8Linear,) if quantization == "int8" else (Int4Linear,)
    names = {name for name, m in decoder.named_modules() if isinstance(m, quantized)}
    assert len(names) == engine.runner.quantization.num_quantized > 0
    # The LM head too, in either mode, as an int8 copy: the embedding keeps its weights.
    assert engine.runner.quantization.int8_head
    assert isinstance(engine.model.get_output_embeddings(), Int8Linear)
    assert engine.model.get_input_embeddings().weight.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = "The river ran past the old mill"
    first = engine.generate([prompt], params)[0].token_ids
    second = engine.generate([prompt], params)[0].token_ids
    assert len(first) == 12 and first == second


def test_int4_keeps_layers_its_kernel_cannot_hold(make_engine, tiny_model_dir):
    """The tiny model's down projections take 688 inputs, no multiple of any int4 group size:
    they stay in the model's dtype and the report names them; every other layer is int4."""
    engine = make_engine(
        dtype="bfloat16", quantization="int4", int4_group_size=32, linear_backend="torch"
    )
    report = engine.runner.quantization
    decoder = engine.model.get_decoder()
    kept = {name for name, reason in report.kept}
    plain = {name for name, m in decoder.named_modules() if type(m) is nn.Linear}
    assert kept == plain and kept, kept
    assert all(name.endswith("mlp.down_proj") for name in kept)
    assert all("not a multiple of the group size 32" in reason for _, reason in report.kept)
    assert all(decoder.get_submodule(n).in_features % 32 for n in kept)


def test_quantize_linears_refuses_an_unknown_group_size(reference_model):
    with pytest.raises(ValueError, match="group size"):
        quantize_linears(reference_model, "int4", 48)
    with pytest.raises(ValueError, match="int4_group_size"):
        EngineConfig(quantization="int4", int4_group_size=48)


def test_batch_invariant_mode_refuses_quantized_weights():
    with pytest.raises(ValueError, match="batch_invariant"):
        EngineConfig(batch_invariant=True, quantization="int8")


def _cpuinfo_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def test_dtype_auto_follows_the_cpu_bf16_flags(make_engine):
    flags = _cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to check the rule against")
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    expected = "bfloat16" if native else "float32"
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("float32", "cpu") == "float32"
    engine = make_engine(dtype="auto")
    assert engine.info.dtype == expected
    assert next(engine.model.parameters()).dtype == getattr(torch, expected)


def test_an_auto_linear_backend_is_timed_once_then_read_from_the_cache(
    make_engine, tmp_path, monkeypatch
):
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))

    def choose(dtype):
        engine = make_engine(dtype=dtype, linear_backend="auto", decode_attention="sdpa")
        return engine, engine.runner.linear

    _, first = choose("float32")
    score = first.onednn_over_torch
    assert first.source == "measured" and score is not None and score > 0
    assert first.backend == ("onednn" if score < 1 else "torch")
    assert first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.is_relative_to(tmp_path)
    again, second = choose("float32")
    assert second.source == "cached"  # no timing run: the choice came from the file
    assert (second.backend, second.cache_path) == (first.backend, first.cache_path)
    assert again.info.linear_backend == first.backend
    # Another dtype is another key: timed, and cached in a file of its own; where oneDNN
    # cannot pack it on this CPU, torch's linears without timing.
    _, other = choose("bfloat16")
    if packs(torch.bfloat16):
        assert other.source == "measured" and other.cache_path != first.cache_path
        assert len(list(first.cache_path.parent.glob("linear-*.json"))) == 2
    else:
        assert (other.backend, other.source) == ("torch", "unpackable")


def test_an_auto_decode_kernel_is_the_fastest_timed_once_then_read_from_the_cache(
    make_engine, tmp_path, monkeypatch
):
    """Every kernel this machine has is timed against the fused one (the paged kernel where
    it builds); the fastest is used if it beats the fused kernel, and the choice is cached."""
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    timed = ["matmul", "paged"] if build_native().kernels else ["matmul"]

    def choose(dtype):
        engine = make_engine(dtype=dtype, decode_attention="auto", linear_backend="torch")
        return engine, engine.runner.decode

    _, first = choose("bfloat16")
    scores = first.over_sdpa
    assert first.source == "measured" and scores is not None and sorted(scores) == timed
    assert all(score > 0 for score in scores.values())
    fastest = min(scores, key=scores.__getitem__)
    assert first.kernel == (fastest if scores[fastest] < 1 else "sdpa")
    assert first.cache_path is not None and first.cache_path.is_relative_to(tmp_path)
    again, second = choose("bfloat16")
    assert second.source == "cached"
    assert (second.kernel, second.over_sdpa) == (first.kernel, first.over_sdpa)
    assert again.info.decode_attention == first.kernel
    _, other = choose("float32")
    assert other.source == "measured" and other.cache_path != first.cache_path
    assert len(list(first.cache_path.parent.glob("decode-attention-*.json"))) == 2


def test_a_given_linear_backend_is_not_timed(make_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    choice = make_engine(linear_backend="torch", decode_attention="sdpa").runner.linear
    assert (choice.backend, choice.source, choice.cache_path) == ("torch", "flag", None)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kernel", ["matmul", "paged"])
def test_a_given_decode_kernel_is_used_untimed_and_batch_invariant_mode_keeps_sdpa(
    make_engine, tmp_path, monkeypatch, kernel
):
    if kernel == "paged" and build_native().kernels is None:
        pytest.skip(f"the C++ kernels do not build here: {build_native().error}")
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    engine = make_engine(decode_attention=kernel, linear_backend="torch")
    choice = engine.runner.decode
    assert (choice.kernel, choice.source, choice.cache_path) == (kernel, "flag", None)
    assert engine.info.decode_attention == kernel
    invariant = make_engine(batch_invariant=True, linear_backend="torch").runner.decode
    assert (invariant.kernel, invariant.source) == ("sdpa", "fixed")
    assert not any(tmp_path.iterdir())  # nothing was timed
    with pytest.raises(ValueError, match="batch-invariant mode attends through the fused"):
        make_engine(batch_invariant=True, decode_attention=kernel)
