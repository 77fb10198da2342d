"""Our folders install as packserve.*, never as generic top-level packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_transformers_does_not_take_our_kernels_for_hub_kernels(tmp_path):
    # From a neutral directory, as a user's process would run.
    code = (
        f"REPO = {str(REPO)!r}\n"
        "import importlib.util, transformers.utils.import_utils as u\n"
        "import packserve.kernels as ours\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or not str(spec.origin).startswith(REPO), spec.origin\n"
        "assert not u.is_kernels_available()\n"
        "assert ours.__name__ == 'packserve.kernels'\n"
        "for name in ('scheduler', 'server'):\n"
        "    s = importlib.util.find_spec(name)\n"
        "    assert s is None or not str(s.origin).startswith(REPO), s.origin\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
