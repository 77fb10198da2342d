"""Decode-step throughput: packserve's ragged paged decode vs transformers' DynamicCache.

Both decode the same batch of prompts (varied lengths) greedily for the same number of steps
on the same model; runs alternate so machine drift hits both alike. Reports tokens/s of the
decode steps alone (prefill excluded) and the ratio.

    .venv/bin/python -m bench.decode [--size bench|tiny] [--batch 32] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from packserve.engine import Engine, EngineConfig
from packserve.models.model_maker import default_model_dir
from packserve.scheduler import SamplingParams


def prompts_for(batch: int, vocab: int, seed: int) -> list[list[int]]:
    """Lognormal lengths, median ~100 tokens, clipped to 8..500."""
    rng = random.Random(seed)
    lengths = [min(500, max(8, int(rng.lognormvariate(4.6, 0.6)))) for _ in range(batch)]
    return [[rng.randrange(16, vocab) for _ in range(n)] for n in lengths]


def packserve_decode(engine: Engine, prompts: list[list[int]], steps: int) -> tuple[float, list]:
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.load().num_waiting:  # prefill everything first
        for d in engine.step():
            tokens[d.request_id] += d.token_ids
    start = time.perf_counter()
    while engine.has_unfinished:
        for d in engine.step():
            tokens[d.request_id] += d.token_ids
    return time.perf_counter() - start, [tokens[i] for i in ids]


@torch.inference_mode()
def transformers_decode(model, prompts: list[list[int]], steps: int) -> tuple[float, list]:
    """Left-padded batch, DynamicCache, greedy: the loop `generate` runs, minus its extras."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    )
    next_ids = out.logits[:, -1].argmax(-1)
    tokens = [next_ids]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        next_ids = out.logits[:, -1].argmax(-1)
        tokens.append(next_ids)
    seconds = time.perf_counter() - start
    return seconds, torch.stack(tokens, dim=1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    path = str(default_model_dir(args.size))
    engines = {
        backend: Engine(
            EngineConfig(
                model=path,
                max_num_seqs=args.batch,
                max_num_batched_tokens=args.batch * 512,
                linear_backend=backend,
                threads=torch.get_num_threads(),  # as the DynamicCache baseline runs
            )
        )
        for backend in ("onednn", "torch")
    }
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = prompts_for(args.batch, reference.config.vocab_size, seed=0)
    load_start = os.getloadavg()
    ours, ours_torch, theirs = [], [], []
    for _ in range(args.repeats):
        t_ours, out_ours = packserve_decode(engines["onednn"], prompts, args.steps)
        t_torch, out_torch = packserve_decode(engines["torch"], prompts, args.steps)
        t_theirs, out_theirs = transformers_decode(reference, prompts, args.steps)
        ours.append(t_ours)
        ours_torch.append(t_torch)
        theirs.append(t_theirs)
    agree = sum(a == b for a, b in zip(out_ours, out_theirs, strict=True))
    agree_torch = sum(a == b for a, b in zip(out_torch, out_theirs, strict=True))
    tokens = args.batch * args.steps
    result = {
        "model": args.size,
        "batch": args.batch,
        "decode_steps": args.steps,
        "prompt_lengths": [len(p) for p in prompts],
        "packserve_tokens_per_s": tokens / statistics.median(ours),
        "transformers_dynamic_cache_tokens_per_s": tokens / statistics.median(theirs),
        "speedup": statistics.median(theirs) / statistics.median(ours),
        "packserve_torch_linear_tokens_per_s": tokens / statistics.median(ours_torch),
        "speedup_torch_linear": statistics.median(theirs) / statistics.median(ours_torch),
        "runs_s": {"packserve": ours, "packserve_torch_linear": ours_torch, "transformers": theirs},
        "sequences_identical": f"{agree}/{args.batch}",
        "sequences_identical_torch_linear": f"{agree_torch}/{args.batch}",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
