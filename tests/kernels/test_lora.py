"""Many LoRA adapters in one batch: each request's greedy output equals its adapter merged into
the base model and run alone (transformers `generate`, float32, up to near-ties); bitwise equal
to the engine alone in batch-invariant mode; adapters never share prefix-cache blocks."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM

from packserve.engine.engine import Engine
from packserve.engine.lora import UnknownAdapter
from packserve.kernels.lora import AdapterError, read_adapter
from packserve.scheduler import SamplingParams

from .test_batch_invariant import assert_bitwise, recorded_logits

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# Eight adapters of ranks 4..64; some adapt the attention only or the MLP only.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [
    (4, ATTENTION + MLP),
    (8, ATTENTION + MLP),
    (16, ATTENTION),
    (64, ATTENTION + MLP),
    (32, MLP),
    (4, ("q_proj", "v_proj")),
    (12, ATTENTION + MLP),
    (24, ATTENTION + MLP),
]
Job = tuple[list[int], str | None]  # (prompt, adapter name or None for the base)


@pytest.fixture(scope="module")
def lora_dirs(tiny_model_dir, make_lora) -> dict[str, str]:
    return {
        f"lora{i}": str(make_lora(tiny_model_dir, rank, seed=100 + i, targets=targets))
        for i, (rank, targets) in enumerate(ADAPTERS)
    }


def lora_flags(dirs: dict[str, str]) -> tuple[str, ...]:
    return tuple(f"{name}={path}" for name, path in dirs.items())


@pytest.fixture(scope="module")
def jobs(tiny_model_dir) -> list[Job]:
    """Two prompts (1..200 tokens) per adapter and for the base, shuffled."""
    rng = random.Random(7)
    names: list[str | None] = [None, *(f"lora{i}" for i in range(len(ADAPTERS)))]
    out: list[Job] = []
    for name in names:
        for _ in range(2):
            n = rng.choice([1, 5, 40, 130, 200])
            out.append(([rng.randrange(16, 8192) for _ in range(n)], name))
    rng.shuffle(out)
    return out


def merged_model(base_dir, adapter_dir: str | None):
    """The base model with the adapter merged in by peft: the ground truth."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is None:
        return base.eval()
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def run(engine: Engine, jobs: Sequence[Job], params: SamplingParams = GREEDY) -> list[list[int]]:
    """Run the jobs together to completion; each one's tokens, in job order."""
    ids = [engine.add_request(p, params, adapter=name) for p, name in jobs]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished:
        for delta in engine.step():
            assert delta.finish_reason != "error", delta.error
            tokens[delta.request_id] += delta.token_ids
    return [tokens[rid] for rid in ids]


@pytest.mark.parametrize("max_loras", [8, 3], ids=["all-resident", "swapping"])
def test_mixed_adapters_greedy_equals_merged_generate_alone(
    make_engine, tiny_model_dir, lora_dirs, jobs, greedy_reference, max_loras
):
    """8 adapters and the base in one batch (packed prefill rows, mixed decode steps); with 3
    slots the adapters are evicted and read again while the others run."""
    reference_greedy, assert_matches = greedy_reference
    engine = make_engine(lora_modules=lora_flags(lora_dirs), max_loras=max_loras, max_lora_rank=64)
    outputs = run(engine, jobs)
    assert engine.scheduler.allocator.num_used == 0
    assert len(engine.scheduler.lora.resident) <= max_loras
    if max_loras < len(ADAPTERS):
        assert engine.scheduler.lora.num_evictions_total > 0
    base = merged_model(tiny_model_dir, None)
    differs_from_base = 0
    for name in [None, *lora_dirs]:
        reference = merged_model(tiny_model_dir, lora_dirs[name]) if name else base
        for (prompt, job_name), got in zip(jobs, outputs, strict=True):
            if job_name != name:
                continue
            expected = reference_greedy(reference, prompt, GREEDY.max_tokens)
            assert_matches(got, expected, f"adapter {name}, prompt of {len(prompt)} tokens")
            if name is not None:
                differs_from_base += got != reference_greedy(base, prompt, GREEDY.max_tokens).tokens
    # The adapters change the output (random LoRA weights are far from zero).
    assert differs_from_base >= 2 * len(ADAPTERS) - 2


def test_lora_bitwise_equal_alone_in_batch_invariant_mode(
    make_engine, lora_dirs, jobs, monkeypatch
):
    """Batch-invariant mode: a request's logits with its adapter are bitwise those of the
    engine running it alone, whatever adapters its neighbours use."""
    engine = make_engine(batch_invariant=True, lora_modules=lora_flags(lora_dirs), max_lora_rank=64)
    alone = []
    for prompt, name in jobs:
        with recorded_logits(monkeypatch) as rows:
            (rid,) = [engine.add_request(prompt, GREEDY, adapter=name)]
            while engine.has_unfinished:
                engine.step()
        alone.append(dict(rows[rid]))
    with recorded_logits(monkeypatch) as rows:
        ids = [engine.add_request(p, GREEDY, adapter=name) for p, name in jobs]
        while engine.has_unfinished:
            engine.step()
    assert engine.runner.lora is not None and engine.runner.lora.step.tiles  # the tiled path
    assert_bitwise(alone, rows, ids)
    # The adapters were applied: the same prompt on the base model gives other logits.
    for (prompt, name), expected in zip(jobs, alone, strict=True):
        if name is not None:
            with recorded_logits(monkeypatch) as rows:
                (rid,) = [engine.add_request(prompt, GREEDY)]
                while engine.has_unfinished:
                    engine.step()
            assert not torch.equal(rows[rid][0][1], expected[len(prompt) - 1])


def test_prefix_cache_never_shared_across_adapters(make_engine, tiny_model_dir, make_lora):
    """The same prompt under two adapters and the base: each only hits its own blocks."""
    a = make_lora(tiny_model_dir, 8, seed=1)
    b = make_lora(tiny_model_dir, 8, seed=2)
    engine = make_engine(lora_modules=(f"a={a}", f"b={b}"))
    prompt = list(range(100, 180))  # 5 full blocks of 16
    params = SamplingParams(temperature=0, max_tokens=2)

    def cached(adapter: str | None) -> int:
        rid = engine.add_request(prompt, params, adapter=adapter)
        hit = 0
        while engine.has_unfinished:
            for delta in engine.step():
                if delta.request_id == rid:
                    hit = delta.num_cached_tokens
        return hit

    assert [cached(None), cached("a"), cached("b")] == [0, 0, 0]
    assert cached("a") > 0 and cached("b") > 0 and cached(None) > 0
    # Loaded again under the same name (other weights): the old blocks are not its.
    engine.unload_lora("a")
    engine.load_lora("a", str(b))
    assert cached("a") == 0


def test_unloading_an_adapter_fails_its_requests(make_engine, tiny_model_dir, make_lora):
    a = make_lora(tiny_model_dir, 4, seed=3)
    engine = make_engine(lora_modules=(f"a={a}",))
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    running = engine.add_request([5] * 10, params, adapter="a")
    engine.step()  # its adapter starts loading
    while engine.scheduler.num_running == 0:
        engine.step()
    waiting = engine.add_request([6] * 10, params, adapter="a")
    base = engine.add_request([7] * 10, params)
    engine.unload_lora("a")
    ended: dict[str, str | None] = {}
    while engine.has_unfinished:
        for delta in engine.step():
            if delta.finish_reason is not None:
                ended[delta.request_id] = delta.finish_reason
    assert ended == {running: "error", waiting: "error", base: "length"}
    assert engine.scheduler.lora.resident == {}
    with pytest.raises(UnknownAdapter):
        engine.add_request([5], params, adapter="a")
    with pytest.raises(UnknownAdapter):
        engine.unload_lora("a")


def test_adapter_that_cannot_be_read_fails_its_waiting_requests(
    make_engine, tiny_model_dir, make_lora, tmp_path
):
    """Weights that vanish between registration and the first use: its requests end with an
    error naming the adapter; the rest run."""
    import shutil

    folder = tmp_path / "gone"
    shutil.copytree(make_lora(tiny_model_dir, 4, seed=4), folder)
    engine = make_engine(lora_modules=(f"gone={folder}",))
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    params = SamplingParams(temperature=0, max_tokens=3)
    bad = engine.add_request([5] * 10, params, adapter="gone")
    good = engine.add_request([5] * 10, params)
    ended = {}
    while engine.has_unfinished:
        for delta in engine.step():
            if delta.finish_reason is not None:
                ended[delta.request_id] = (delta.finish_reason, delta.error)
    assert ended[good][0] == "length"
    assert ended[bad][0] == "error" and "'gone'" in ended[bad][1]


def test_adapter_folder_checks(tiny_model_dir, make_lora, tmp_path):
    """Refused with a message: a rank above the pool's, a target other than the projections,
    a folder that is not an adapter."""
    from packserve.kernels.lora import read_adapter_config

    big = make_lora(tiny_model_dir, 32, seed=5)
    with pytest.raises(AdapterError, match="max-lora-rank 16"):
        read_adapter_config(big, max_rank=16)
    assert read_adapter(big, max_rank=32).max_rank == 32
    head = make_lora(tiny_model_dir, 4, seed=6, targets=("q_proj", "lm_head"))
    with pytest.raises(AdapterError, match="lm_head"):
        read_adapter_config(head, max_rank=16)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        read_adapter_config(tmp_path, max_rank=16)


def test_no_adapter_no_wrapper(make_engine):
    """LoRA off (the default): the model's projections are not wrapped at all."""
    from packserve.kernels.lora import LoRALinear

    engine = make_engine()
    assert engine.runner.lora is None
    assert not any(isinstance(m, LoRALinear) for m in engine.model.modules())


def test_smollm2_adapters_greedy_equal_merged_generate_alone(
    smollm2_dir, make_lora, greedy_reference
):
    """The real default model: two adapters and the base in one batch, each request's greedy
    output equal to its adapter merged into SmolLM2 and run alone (up to near-ties)."""
    from packserve.engine.engine import EngineConfig

    reference_greedy, assert_matches = greedy_reference
    dirs = {
        "r8": str(make_lora(smollm2_dir, 8, seed=31, alpha=8)),
        "r16": str(make_lora(smollm2_dir, 16, seed=32, targets=ATTENTION, alpha=16)),
    }
    engine = Engine(
        EngineConfig(model=str(smollm2_dir), dtype="float32", lora_modules=lora_flags(dirs))
    )
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Name a primary colour."]
    prompts = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            )
        )
        for q in questions
    ]
    jobs: list[Job] = [(p, name) for name in (None, "r8", "r16") for p in prompts]
    outputs = run(engine, jobs, SamplingParams(temperature=0, max_tokens=12))  # EOS ends it
    for name in (None, "r8", "r16"):
        reference = merged_model(smollm2_dir, dirs[name] if name else None)
        for (prompt, job_name), got in zip(jobs, outputs, strict=True):
            if job_name == name:
                expected = reference_greedy(reference, prompt, GREEDY.max_tokens)
                assert_matches(got, expected, f"SmolLM2 with adapter {name}")


def toy_decoder_layer() -> torch.nn.Module:
    """A decoder layer's projections (float64): q/k/v on one input, o alone, gate/up on one
    input, down alone."""
    layer = torch.nn.Module()
    layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
    for name, fan_in, fan_out in (("q_proj", 24, 16), ("k_proj", 24, 8), ("v_proj", 24, 8)):
        setattr(layer.self_attn, name, torch.nn.Linear(fan_in, fan_out, dtype=torch.float64))
    layer.self_attn.o_proj = torch.nn.Linear(16, 24, bias=False, dtype=torch.float64)
    for name in ("gate_proj", "up_proj"):
        setattr(layer.mlp, name, torch.nn.Linear(24, 40, bias=False, dtype=torch.float64))
    layer.mlp.down_proj = torch.nn.Linear(40, 24, bias=False, dtype=torch.float64)
    return layer


@pytest.mark.parametrize("num_tokens", [40, 300], ids=["dense", "segmented"])
@pytest.mark.parametrize(
    ("mode", "dtype"),
    [("merged", torch.float64), ("merged", torch.bfloat16), ("wrapped", torch.float64)]
    + [("tiled", torch.float64)],
)
def test_every_path_adds_each_tokens_own_adapter(num_tokens, mode, dtype):
    """The pool's paths (the shrink on the fused base GEMM or on its own, dense expand for
    small forwards, segmented bmm for large ones, fixed tiles in batch-invariant mode) each
    give base(x) + x @ A_s^T @ B_s^T * scaling for a token of slot s, and base(x) for slot
    -1; adapters of several ranks, one leaving some projections alone; siblings of a fused
    GEMM called in the model's order, out of it, and on another input. bfloat16 takes the
    packed expand on a CPU with oneDNN; it is checked against float64 from the same weights."""
    import copy

    from packserve.kernels.fused import fuse_shared_inputs
    from packserve.kernels.invariant import RowTiled, TileRows
    from packserve.kernels.lora import LoRALinear, LoRAPool, LoRAWeights

    torch.manual_seed(0)
    layer = toy_decoder_layer().to(dtype)
    reference = copy.deepcopy(layer).double()
    if mode == "merged":
        assert len(fuse_shared_inputs(layer, pack=False)) == 2
    pool = LoRAPool(layer, max_loras=3, max_rank=8, merge=mode == "merged")
    wrapped = [m for m in layer.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == (0 if mode == "merged" else 7)  # merged: all ride on base GEMMs
    adapters = {}
    for slot, rank in ((0, 8), (2, 3)):
        modules = {
            name: (
                torch.randn(rank, m.in_features, dtype=torch.float64).to(dtype).double(),
                torch.randn(m.out_features, rank).to(dtype).double(),
            )
            for name, m in reference.named_modules()
            if name.endswith("_proj")
            and not (slot == 2 and name in ("mlp.down_proj", "self_attn.k_proj"))
        }
        pool.write(slot, LoRAWeights(modules))
        adapters[slot] = modules
    slot_ids = [random.Random(i).choice([-1, 0, 2]) for i in range(num_tokens)]
    pool.begin(slot_ids, 16 if mode == "tiled" else None)
    x = torch.randn(num_tokens, 24).to(dtype)
    other = torch.randn(num_tokens, 24).to(dtype)
    # q/k/v in order, then v, k on another input (each computes the whole fused GEMM), then
    # up before gate (out of order); o and down alone.
    calls = [("self_attn.q_proj", x), ("self_attn.k_proj", x), ("self_attn.v_proj", x)]
    calls += [("self_attn.v_proj", other), ("self_attn.k_proj", other)]
    calls += [("mlp.up_proj", x), ("mlp.gate_proj", x), ("self_attn.o_proj", x[:, :16])]
    calls += [("mlp.down_proj", torch.cat([x, x[:, :16]], dim=1))]
    for name, inputs in calls:
        module = layer.get_submodule(name)
        if mode == "tiled":  # a tiled forward calls each projection once
            pool.begin(slot_ids, 16)
        got = RowTiled(module, TileRows(16))(inputs) if mode == "tiled" else module(inputs)
        expected = reference.get_submodule(name)(inputs.double()).clone()
        for row, slot in enumerate(slot_ids):
            if slot >= 0 and name in adapters[slot]:
                a, b = adapters[slot][name]
                expected[row] += inputs[row].double() @ a.T @ b.T
        tol = {"atol": 0.3, "rtol": 0.03} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(got.double(), expected, **tol, msg=f"{mode} {name}")


@pytest.mark.parametrize(
    "slot_ids",
    [[0, 0, -1, 1, 1], [2] * 7, [-1, 0, 1, 1, -1, 2, 2, 2], [1, -1, -1, -1]]
    + [random.Random(seed).choices([-1, 0, 1, 2], k=150) for seed in range(5)],
)
def test_segments_place_every_token(slot_ids):
    """Every adapter token has one piece position of its own slot, which gathers it; base
    tokens and pads point at a pad position (a zero delta), added when pieces have none."""
    from packserve.kernels.lora.layers import _segments

    s = _segments(slot_ids, rank=2, num_slots=3, like=torch.zeros(0))
    gather, real, place = s.gather.tolist(), s.real[:, 0].tolist(), s.place.tolist()
    assert len(gather) == len(real) == s.seg * len(s.slots)
    adapter_rows = [row for row, slot in enumerate(slot_ids) if slot >= 0]
    assert sorted(place[row] for row in adapter_rows) == [i for i, r in enumerate(real) if r]
    for row, slot in enumerate(slot_ids):
        if slot >= 0:
            assert gather[place[row]] == row and s.slots[place[row] // s.seg] == slot
        else:
            assert real[place[row]] == 0
    assert len(gather) <= 2 * len(adapter_rows) + s.seg


def test_decode_steps_follow_slot_writes_between_them():
    """Forwards with the same slots back to back (decode steps reuse their masks) follow
    each write between them: a new adapter of the same rank in a slot, then one of a higher
    rank (the pool's rank grows, and with it every mask's width)."""
    import copy

    from packserve.kernels.fused import fuse_shared_inputs
    from packserve.kernels.lora import LoRAPool, LoRAWeights

    torch.manual_seed(0)
    layer = toy_decoder_layer()
    plain_q = copy.deepcopy(layer.self_attn.q_proj)
    fuse_shared_inputs(layer, pack=False)
    pool = LoRAPool(layer, max_loras=2, max_rank=8, merge=True)
    q = layer.get_submodule("self_attn.q_proj")
    slot_ids = [0, -1, 1, 0]
    delta = {s: torch.zeros(16, 24, dtype=torch.float64) for s in (0, 1)}  # B @ A per slot
    for slot, rank in ((0, 2), (1, 2), (0, 2), (1, 8)):
        a = torch.randn(rank, 24, dtype=torch.float64)
        b = torch.randn(16, rank, dtype=torch.float64)
        pool.write(slot, LoRAWeights({"self_attn.q_proj": (a, b)}))
        delta[slot] = b @ a
        pool.begin(slot_ids, None)
        x = torch.randn(len(slot_ids), 24, dtype=torch.float64)  # each forward's own input
        got = q(x)
        expected = plain_q(x) + torch.stack(
            [x[i] @ delta[s].T if s >= 0 else torch.zeros(16, dtype=torch.float64)
             for i, s in enumerate(slot_ids)]
        )  # fmt: skip
        torch.testing.assert_close(got, expected, msg=f"after writing slot {slot} (rank {rank})")
