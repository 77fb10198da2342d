"""deploy/ci/capacity.py (the README's capacity numbers) runs, bounded, against a replica."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "ci" / "capacity.py"


def test_capacity_script_measures_a_replica(replica, tmp_path):
    out = tmp_path / "capacity.json"
    argv = [sys.executable, str(SCRIPT), "--url", replica.url, "--concurrency", "1,2"]
    argv += ["--duration", "1", "--requests", "3", "--prompt-tokens", "8", "--max-tokens", "4"]
    argv += ["--json", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| concurrency |" in result.stdout
    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["failed"] == 0 and 1 <= level["requests"] <= 3
        assert level["requests_per_s"] > 0 and level["output_tokens_per_s"] > 0
    assert report["machine"]["cores"] >= 1
