"""The scheduler is pure Python: importing it must not pull in heavy dependencies.

Checked in a fresh interpreter, since other tests in this pytest process import torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "fastapi", "numpy")

CODE = """
import sys
import packserve.scheduler
import packserve.scheduler.block_manager
import packserve.scheduler.config
import packserve.scheduler.outputs
import packserve.scheduler.packing
import packserve.scheduler.request
import packserve.scheduler.scheduler
heavy = {heavy!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
assert not loaded, f"importing the scheduler loaded: {{loaded}}"
print("ok")
"""


@pytest.mark.parametrize("module", HEAVY)
def test_scheduler_import_does_not_load(module):
    proc = subprocess.run(
        [sys.executable, "-c", CODE.format(heavy=(module,))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_check_can_fail():
    # The same probe reports a module that really is loaded, so a pass above means something.
    code = CODE.replace("import packserve.scheduler\n", "import packserve.scheduler\nimport json\n")
    proc = subprocess.run(
        [sys.executable, "-c", code.format(heavy=("json",))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "json" in proc.stderr
