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


# Which packserve packages each package may import: server -> engine -> kernels, models ->
# scheduler, nothing back. (The launcher is stdlib + httpx; it imports no packserve package.)
ALLOWED = {
    "scheduler": set(),
    "models": set(),
    "kernels": {"scheduler"},
    "engine": {"kernels", "models", "scheduler"},
    "server": {"engine", "models", "scheduler"},
}


def _imported_packages(path: Path) -> set[str]:
    """packserve.<package> names a module imports, at any depth, absolute or relative."""
    import ast

    package = path.relative_to(REPO / "packserve").parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: within the package
            if node.level > 1:
                found.add("<outside>")
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "packserve" and len(parts) > 1 and parts[1] != package:
                found.add(parts[1])
    return found


def test_imports_go_one_way():
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / "packserve" / package).rglob("*.py")):
            extra = _imported_packages(path) - allowed
            assert not extra, f"{path.relative_to(REPO)} imports packserve.{sorted(extra)}"


def test_offline_api_from_the_package_root():
    code = (
        "import sys, packserve.scheduler\n"
        "assert 'torch' not in sys.modules  # the root's names load lazily\n"
        "from packserve import Engine, EngineConfig, SamplingParams, Completion\n"
        "assert Engine.__module__ == 'packserve.engine.engine'\n"
        "assert SamplingParams.__module__ == 'packserve.scheduler.request'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_loads_no_torch():
    """`packserve --help` and `serve --help` answer without importing torch or transformers
    (seconds on a cold machine); their flags show the defaults."""
    code = (
        "import contextlib, io, sys\n"
        "from packserve.server.cli import main\n"
        "for argv in (['--help'], ['serve', '--help'], ['generate', '--help']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n"
        "        main(argv)\n"
        "    assert 'usage: packserve' in out.getvalue()\n"
        "    if argv[0] != '--help':\n"
        "        assert '(default: 64)' in out.getvalue()  # --max-num-seqs\n"
        "heavy = {'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
