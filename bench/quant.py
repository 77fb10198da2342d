"""Weight-only int8 / int4 on SmolLM2-135M-Instruct: perplexity and decode speed vs bf16 / fp32.

Quality: perplexity on the first 1024 tokens of three fixed documents of the repository
corpus (not text the model was trained on), the decoder's linear layers and the LM head
quantized by the function the runner uses
(`kernels.quant.quantize_linears`), teacher-forced through transformers' own attention.
Speed: decode tokens/s through the engine (greedy, ignore_eos, a fixed max_tokens) at batch
1 and 16, every configuration's engine loaded once and the runs interleaved (A B C D, A B C
D, ...), so the machine's other jobs hit them alike; the median of the repeats is reported.
A run's prefill steps are timed apart from its decode steps: decode tok/s counts the decode
steps alone, end-to-end tok/s the whole generate (prefill included).

    PYTHONPATH=. .venv/bin/python -m bench.quant [--repeats 3] [--max-tokens 32] [--threads 1]
        [--out quant]

One intra-op thread by default: on this project's shared 2-core machine, with other jobs
runnable, two OpenMP threads mostly wait on each other (a 512-token bf16 forward of this
model took 14 s with 2 threads and 2.2 s with 1, measured side by side with the same load).

Writes bench/results/<out>.json (quant.md and quant_zen3.md are written from them by hand).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from packserve.engine import Engine, EngineConfig
from packserve.kernels.machine import cpu_flags, cpu_model
from packserve.kernels.quant import quantize_linears
from packserve.models.corpus import CORPUS_DIR
from packserve.models.smollm2 import default_model_dir
from packserve.scheduler import SamplingParams

OUT = Path(__file__).parent / "results"
DOCUMENTS = ("03-weather.txt", "10-library.txt", "16-caches-and-memory.txt")
DOCUMENT_TOKENS = 1024  # each document's first tokens (they have ~1300): keeps the run short
# (name, dtype, quantization, int4 group size)
QUALITY = (
    ("fp32", "float32", "none", 64),
    ("bf16", "bfloat16", "none", 64),
    ("int8", "bfloat16", "int8", 64),
    ("int4-g64", "bfloat16", "int4", 64),
    ("int4-g32", "bfloat16", "int4", 32),
)
# (name, dtype, quantization): int4 at the engine's default group size
SPEED = (("fp32", "float32", "none"), ("bf16", "bfloat16", "none"))
SPEED += (("int8", "bfloat16", "int8"), ("int4", "bfloat16", "int4"))
SPEED += (("int8-fp32", "float32", "int8"),)  # int8 weights, float32 activations
BATCHES = (1, 16)
PROMPT_TOKENS = 48


@torch.inference_mode()
def perplexity(model_dir: str, dtype: str, quantization: str, group: int, docs: list[list[int]]):
    """exp(mean next-token NLL) over all documents' tokens, and per document."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    report = quantize_linears(model, quantization, group)  # type: ignore[arg-type]
    per_doc, total_nll, total_tokens = [], 0.0, 0
    for ids in docs:
        logits = model(torch.tensor([ids])).logits[0, :-1].float()  # [T-1, V]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
        per_doc.append(math.exp(nll.item() / (len(ids) - 1)))
        total_nll += nll.item()
        total_tokens += len(ids) - 1
    kept = len(report.kept)
    return math.exp(total_nll / total_tokens), per_doc, report.num_quantized, kept


def decode_run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """One greedy generate of `prompts`, its prefill steps and its decode steps timed apart."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for prompt in prompts:
        engine.add_request(prompt, params)
    num_tokens = 0
    while engine.load().num_waiting:  # prefill (and the first token of each)
        num_tokens += sum(len(d.token_ids) for d in engine.step())
    decode_start, first_tokens = time.perf_counter(), num_tokens
    while engine.has_unfinished:
        num_tokens += sum(len(d.token_ids) for d in engine.step())
    end = time.perf_counter()
    assert num_tokens == len(prompts) * max_tokens, num_tokens
    return {
        "decode_tok_s": (num_tokens - first_tokens) / (end - decode_start),
        "e2e_tok_s": num_tokens / (end - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="quant", help="results stem under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = [
        tokenizer((CORPUS_DIR / name).read_text()).input_ids[:DOCUMENT_TOKENS] for name in DOCUMENTS
    ]
    load_start = os.getloadavg()
    started = time.perf_counter()

    quality = {}
    for name, dtype, quantization, group in QUALITY:
        ppl, per_doc, num_quantized, kept = perplexity(model_dir, dtype, quantization, group, docs)
        quality[name] = {"ppl": ppl, "per_doc": per_doc, "quantized": num_quantized, "kept": kept}
        print(f"{name}: ppl {ppl:.3f} {[round(p, 3) for p in per_doc]}", flush=True)

    engines = {
        name: Engine(
            EngineConfig(
                model=model_dir, dtype=dtype, quantization=quantization, threads=args.threads
            )
        )
        for name, dtype, quantization in SPEED
    }
    prompts = [ids[i * PROMPT_TOKENS : (i + 1) * PROMPT_TOKENS] for ids in docs for i in range(6)]
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        name: {batch: [] for batch in BATCHES} for name in engines
    }
    for engine in engines.values():  # warm up: first calls allocate and pick kernels
        decode_run(engine, prompts[:2], 4)
    for rep in range(args.repeats):
        for batch in BATCHES:
            for name, engine in engines.items():
                result = decode_run(engine, prompts[:batch], args.max_tokens)
                runs[name][batch].append(result)
                print(f"rep {rep} b={batch} {name}: {result}", flush=True)
    speed = {
        name: {
            str(batch): {
                key: statistics.median(r[key] for r in results)
                for key in ("decode_tok_s", "e2e_tok_s")
            }
            | {"runs": results}
            for batch, results in by_batch.items()
        }
        for name, by_batch in runs.items()
    }
    kernels = {
        name: {
            "dtype": e.info.dtype,
            "linear_backend": e.info.linear_backend,
            "linear_source": e.runner.linear.source,
            "quantization": e.info.quantization,
        }
        for name, e in engines.items()
    }
    flags = cpu_flags() or frozenset()
    result = {
        "model": "SmolLM2-135M-Instruct (from the Q4_1 GGUF, dequantized to float32)",
        "documents": list(DOCUMENTS),
        "num_tokens": [len(d) for d in docs],
        "quality": quality,
        "speed": speed,
        "kernels": kernels,
        "max_tokens": args.max_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "repeats": args.repeats,
        "seconds": time.perf_counter() - started,
        "machine": {
            "cpu": cpu_model(),
            "lscpu": _lscpu(),
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("quality", "kernels", "machine")}, indent=1))


def _lscpu() -> str:
    """lscpu's model line(s), as the machine names itself."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Flags")
    lines = [line for line in text.splitlines() if line.startswith(keep)]
    return "\n".join(" ".join(line.split()) for line in lines if not line.startswith("Flags"))


if __name__ == "__main__":
    main()
