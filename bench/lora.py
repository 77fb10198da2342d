"""Many LoRA adapters served together: throughput with adapters mixed into every step against
the base model alone on the same workload, through HTTP as bench/serve.py sends it.

Per model (the tiny one, then SmolLM2-135M-Instruct), three packserve servers (this tree) run
side by side (an idle one costs nothing): `base` (no LoRA), `lora8` (--lora-modules with 8
adapters, --max-loras 8) and `lora64` (64 adapters registered, --max-loras 8: adapters are
evicted and read again while requests wait for them). The adapters are random rank-8 LoRA on
all seven projections (q/k/v/o, gate/up/down), written in PEFT's folder format. Each workload
(2 x c streamed completions, corpus prompts, ignore_eos, output lengths uniform in 16..128) runs
at c=16 and c=64 against each server (after a warm-up request on each adapter of the first
8, so the runs start with the slots full: lora8 measures the steady state, lora64 keeps loading
adapters throughout): `base` with the base model, `lora8` with request i on
adapter i % 8, `lora64` with adapter i % 64. The runs are interleaved (base, lora8, lora64, then
the reverse order) so load from other processes falls on all alike; a ratio is the adapters'
output tok/s over the base's, over both repeats (goal >= 0.8). Every request must succeed.

    PYTHONPATH=$PWD .venv/bin/python -m bench.lora [--models tiny,smollm2]

Writes bench/results/lora.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench import serve
from packserve.kernels.lora.adapter import TARGET_MODULES
from packserve.models.model_maker import default_model_dir
from packserve.models.smollm2 import default_model_dir as smollm2_model_dir
from packserve.server.launcher import ServerProcess

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CONCURRENCIES = (16, 64)
RANK = 8
NUM_ADAPTERS = 64
MAX_LORAS = 8


def make_adapters(model_dir: Path, folder: Path, count: int) -> list[Path]:
    """`count` random rank-RANK LoRA adapters on every projection, as PEFT saves them."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    assert set(shapes) == set(TARGET_MODULES)
    paths = []
    for i in range(count):
        path = folder / f"adapter-{i}"
        paths.append(path)
        if (path / "adapter_model.safetensors").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for name, (fan_in, fan_out) in shapes.items():
                part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{name}"
                a = torch.randn(RANK, fan_in, generator=generator) / fan_in**0.5
                tensors[key + ".lora_A.weight"] = a
                tensors[key + ".lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        peft_config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": RANK * 0.05,  # small updates: the outputs stay the model's kind
            "target_modules": list(shapes),
        }
        (path / "adapter_config.json").write_text(json.dumps(peft_config))
    return paths


def bench_model(name: str, model_dir: Path, threads: int | None) -> dict[str, Any]:
    tokenizer = serve.load_tokenizer(str(model_dir))
    adapters = make_adapters(model_dir, RESULTS / "raw" / "lora-adapters" / name, NUM_ADAPTERS)
    modules = [f"a{i}={path}" for i, path in enumerate(adapters)]
    lora_flags = ["--max-loras", str(MAX_LORAS), "--max-lora-rank", str(RANK)]
    flags = {
        "base": [],
        "lora8": ["--lora-modules", *modules[:MAX_LORAS], *lora_flags],
        "lora64": ["--lora-modules", *modules, *lora_flags],
    }
    servers = {
        kind: ServerProcess(
            ["--model", str(model_dir), "--served-model-name", "base", *extra],
            env={"PYTHONPATH": str(ROOT)},
            threads=threads,
            cwd=ROOT,
            ready_timeout=300,
        )
        for kind, extra in flags.items()
    }
    try:
        for server in servers.values():
            server.start()
        for kind, server in servers.items():  # a warm-up each, every slot filled
            names = ["base"] if kind == "base" else [f"a{i}" for i in range(MAX_LORAS)]
            for model in names:
                serve.warmup(serve.Target(server.url, model), 2)
        spans = {"base": 0, "lora8": MAX_LORAS, "lora64": NUM_ADAPTERS}

        def targets_of(kind: str, url: str, n: int) -> list[serve.Target]:
            span = spans[kind]
            return [serve.Target(url, f"a{i % span}" if span else "base") for i in range(n)]

        measured = serve.interleaved(
            name, {kind: s.url for kind, s in servers.items()}, targets_of, tokenizer,
            CONCURRENCIES,
        )  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    runs = {
        c: {kind: [summary for summary, _ in repeats] for kind, repeats in kinds.items()}
        for c, kinds in measured.items()
    }
    return {"model": name, "runs": runs, "ratios": ratios(runs)}


def ratios(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per concurrency: each LoRA server's output tokens per second over the base's (tokens and
    seconds summed over the repeats), and its failures."""
    out = {}
    for c, kinds in runs.items():

        def tokps(summaries: list[dict[str, Any]]) -> float:
            return sum(s["output_tokens"] for s in summaries) / sum(
                s["duration_s"] for s in summaries
            )

        base = tokps(kinds["base"])
        out[c] = {
            "base_tokps": round(base, 1),
            **{
                kind: {
                    "tokps": round(tokps(kinds[kind]), 1),
                    "ratio": round(tokps(kinds[kind]) / base, 3),
                    "failed": sum(s["failed"] for s in kinds[kind]),
                    "completed": sum(s["completed"] for s in kinds[kind]),
                }
                for kind in ("lora8", "lora64")
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--threads", type=int, default=None, help="server OMP threads")
    args = parser.parse_args()
    dirs = {"tiny": lambda: default_model_dir("tiny"), "smollm2": smollm2_model_dir}
    uptime_start = serve.uptime()
    results = [bench_model(m, dirs[m](), args.threads) for m in args.models.split(",")]
    result = {
        **serve.machine(uptime_start),
        "threads": args.threads,
        "rank": RANK,
        "num_adapters": NUM_ADAPTERS,
        "max_loras": MAX_LORAS,
        "models": results,
    }
    serve.save_results("lora", result, markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Many LoRA adapters in one batch vs the base model alone",
        "",
        f"CPU: {r['cpu']} ({r['num_cpus']} cores; other processes show in the load average, "
        f"`uptime` before: {r['uptime_start']}; after: {r['uptime_end']}). Random rank-"
        f"{r['rank']} adapters on all seven projections; `lora8`: 8 adapters, --max-loras "
        f"{r['max_loras']}; `lora64`: {r['num_adapters']} adapters registered, --max-loras "
        f"{r['max_loras']}. 2 x c streamed completions per run (output 16..128 tokens, "
        "ignore_eos), request i on adapter i % 8 (i % 64); runs interleaved base, lora8, "
        "lora64, then reversed; ratio = output tok/s over the base's, both repeats summed.",
        "",
        "| model | c | base tok/s | lora8 tok/s | lora8 / base | lora64 tok/s "
        "| lora64 / base | failed (lora8, lora64) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in r["models"]:
        for c, x in m["ratios"].items():
            a, b = x["lora8"], x["lora64"]
            lines.append(
                f"| {m['model']} | {c} | {x['base_tokps']} | {a['tokps']} | **{a['ratio']}** "
                f"| {b['tokps']} | **{b['ratio']}** | {a['failed']}, {b['failed']} |"
            )
    lines += ["", "Goal: ratio >= 0.8; with 64 adapters over 8 slots no request fails.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
