"""Structured output's cost: a c=16 run with every request constrained by a JSON schema
against the same prompts unconstrained, through HTTP as bench/serve.py sends them.

One packserve server (this tree) on SmolLM2-135M-Instruct. 64 streamed chat requests at
concurrency 16, greedy, each asking for data for one of bench/grammar_engines.py's 10 schemas
(flat to nested) with `response_format: json_schema`. The unconstrained run then sends the same
prompts with `ignore_eos` and `max_tokens` set to the tokens its constrained twin produced, so
both runs generate the same number of tokens per request: the output tok/s ratio is the
grammar's overhead alone (goal >= 0.8). Grammar compile time (to a matcher's first mask, on a
fresh compiler per schema so no cache helps) is measured in this process with the engine's own
compiler.

    PYTHONPATH=$PWD .venv/bin/python -m bench.structured

Writes bench/results/structured.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from bench import serve
from bench.grammar_engines import SCHEMAS, cpu_model
from packserve.engine.structured import GrammarCompiler, GrammarState
from packserve.models.smollm2 import default_model_dir
from packserve.scheduler import ScheduledSequence, StructuredOutput
from packserve.server.launcher import ServerProcess

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 16
MAX_TOKENS = 256


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "item", "schema": schema, "strict": True},
    }


def workload(tokenizer: Any, num: int) -> list[tuple[serve.Prompt, dict[str, Any]]]:
    """(prompt, schema) pairs: the schemas in turn, each prompt asking for another item."""
    out = []
    for i in range(num):
        schema = SCHEMAS[i % len(SCHEMAS)][0]
        text = f"Give example data number {i} as JSON for this schema: {json.dumps(schema)}"
        chat = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        num = len(tokenizer(rendered, add_special_tokens=False).input_ids)
        out.append((serve.Prompt(text, num, MAX_TOKENS), schema))
    return out


def run(targets: list[serve.Target], prompts: list[serve.Prompt], tokenizer: Any) -> dict:
    records, duration = asyncio.run(serve.run_each(targets, prompts, CONCURRENCY, 300.0))
    serve.check(records, tokenizer)
    return {"records": records, "summary": serve.summarize(records, duration)}


def compile_times_ms(tokenizer: Any, vocab_size: int, eos: int) -> list[float]:
    """Per schema: compile until its first mask is filled (llguidance builds lazily, so the
    first mask is part of getting ready)."""
    times = []
    # One compiler: each schema is new to it, so its cache never helps.
    compiler = GrammarCompiler(tokenizer, vocab_size, [eos])
    compiler.compile(StructuredOutput("json_object")).result()  # the tokenizer wrap, once
    for i, (schema, _) in enumerate(SCHEMAS):
        constraint = StructuredOutput("json_schema", json.dumps(schema))
        t0 = time.perf_counter()
        start = compiler.compile(constraint).result()
        state = GrammarState(vocab_size, vocab_size)
        state.add(f"s{i}", start)
        state.masks([ScheduledSequence(f"s{i}", (0,), 0, (), is_decode=False, sample=True)])
        times.append((time.perf_counter() - t0) * 1e3)
    compiler.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="server OMP threads")
    parser.add_argument("--num-requests", type=int, default=64)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    model_dir = default_model_dir()
    tokenizer = serve.load_tokenizer(str(model_dir))
    compile_ms = compile_times_ms(tokenizer, len(tokenizer), tokenizer.eos_token_id)
    work = workload(tokenizer, args.num_requests)
    prompts = [p for p, _ in work]
    server = ServerProcess(
        ["--model", str(model_dir), "--served-model-name", "smollm2"],
        env={"PYTHONPATH": str(ROOT)},
        threads=args.threads,
        cwd=ROOT,
        ready_timeout=300,
    )
    server.start()
    try:
        base = serve.Target(server.url, "smollm2", endpoint="chat", temperature=0.0)
        serve.warmup(base, 2)
        constrained_targets = [
            replace(base, ignore_eos=False, extra_body={"response_format": response_format(s)})
            for _, s in work
        ]
        # Warm every schema's grammar (compiled once per server, cached), outside the timing.
        warm = [replace(p, max_tokens=2) for p in prompts[: len(SCHEMAS)]]
        run(constrained_targets[: len(SCHEMAS)], warm, tokenizer)
        constrained = run(constrained_targets, prompts, tokenizer)
        lengths = [max(1, r.output_tokens) for r in constrained["records"]]
        twins = [replace(p, max_tokens=n) for p, n in zip(prompts, lengths, strict=True)]
        plain = run([base] * len(twins), twins, tokenizer)
    finally:
        server.stop()
    valid = 0
    for rec, (_, schema) in zip(constrained["records"], work, strict=True):
        try:
            jsonschema.validate(json.loads(rec.text), schema)
            valid += 1
        except Exception:  # counted, not raised: the figure says how many were valid
            pass
    c, u = constrained["summary"], plain["summary"]
    ratio = c["output_throughput"] / u["output_throughput"] if u["output_throughput"] else None
    result = {
        "cpu": cpu_model(),
        "num_cpus": os.cpu_count(),
        "loadavg_1m_before": round(load_before, 2),
        "model": "SmolLM2-135M-Instruct",
        "concurrency": CONCURRENCY,
        "num_requests": args.num_requests,
        "num_schemas": len(SCHEMAS),
        "threads": args.threads,
        "compile_ms": [round(x, 2) for x in compile_ms],
        "compile_ms_p50": round(statistics.median(compile_ms), 2),
        "compile_ms_p99": round(float(np.percentile(compile_ms, 99)), 2),
        "constrained_valid": valid,
        "constrained": c,
        "unconstrained": u,
        "output_tokps_ratio": round(ratio, 3) if ratio else None,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (RESULTS / "structured.md").write_text(md)
    print(md)


def markdown(r: dict[str, Any]) -> str:
    c, u = r["constrained"], r["unconstrained"]

    def row(name: str, s: dict[str, Any]) -> str:
        return (
            f"| {name} | {s['completed']}/{s['num_requests']} | {s['output_tokens']} "
            f"| {s['output_throughput']:.1f} | {s['ttft_ms']['p50']:.0f} "
            f"| {s['ttft_ms']['p99']:.0f} | {s['tpot_ms']['p50']:.1f} | {s['duration_s']:.1f} |"
        )

    return "\n".join(
        [
            "# Structured output: constrained vs unconstrained at c=16",
            "",
            f"CPU: {r['cpu']}, {r.get('num_cpus', 2)} cores, load average "
            f"{r.get('loadavg_1m_before', 'not recorded')} before the run. "
            f"Model {r['model']}, {r['num_requests']} streamed chat requests at "
            f"c={r['concurrency']}, greedy; {r['num_schemas']} JSON schemas "
            "(bench/grammar_engines.py) in turn via `response_format: json_schema`. The "
            "unconstrained run sends the same prompts with `ignore_eos` and each request's "
            "max_tokens set to what its constrained twin produced: same tokens, no grammar.",
            "",
            "| run | ok | output tokens | output tok/s | TTFT p50 ms | TTFT p99 ms "
            "| TPOT p50 ms | duration s |",
            "|---|---|---|---|---|---|---|---|",
            row("constrained (json_schema)", c),
            row("unconstrained", u),
            "",
            f"**Output tok/s ratio constrained / unconstrained: {r['output_tokps_ratio']}** "
            "(goal >= 0.8).",
            f"Constrained outputs valid for their schema (jsonschema): "
            f"{r['constrained_valid']}/{r['num_requests']}.",
            "",
            f"Grammar compile time (fresh compile to the first mask, {r['num_schemas']} "
            f"schemas): p50 {r['compile_ms_p50']} ms, p99 {r['compile_ms_p99']} ms.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
