"""The Dockerfile and .dockerignore, checked without a Docker engine: parsed instruction by
instruction for the essentials, and linted by hadolint when it is installed."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from packserve.server.settings import default_served_model_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (Docker's rules:
    a comment line inside a continued instruction is skipped)."""
    instructions: list[Instruction] = []
    stage = -1
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def arg_defaults(instructions: list[Instruction], stage: int) -> dict[str, str]:
    """ARG defaults visible in `stage`: the global ones (before the first FROM) and its own."""
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and ins.stage in (-1, stage) and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_base_images_are_pinned_python_311_slim(instructions):
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 1
    for ins in froms:
        image = expand(ins.args.split()[0], arg_defaults(instructions, ins.stage))
        assert "$" not in image, f"unresolved base image {ins.args!r}"
        assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image
    # A CUDA base image can be chosen at build time, and the choice is documented.
    assert any(i.keyword == "ARG" and i.args.startswith("BASE_IMAGE=") for i in instructions)
    text = DOCKERFILE.read_text()
    assert "BASE_IMAGE" in text.split("ARG BASE_IMAGE")[0], "BASE_IMAGE is not documented"
    assert "TORCH_INDEX_URL" in text.split("ARG TORCH_INDEX_URL")[0], "torch index not documented"


def test_final_stage_runs_as_a_numeric_non_root_user(instructions):
    users = [i.args for i in final_stage(instructions) if i.keyword == "USER"]
    assert users, "the final stage has no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    # Numeric, so Kubernetes' runAsNonRoot can check it; deploy/k8s uses the same uid.
    assert user.isdigit(), f"USER {users[-1]} should be numeric"
    deployment = (REPO / "deploy/k8s/deployment.yaml").read_text()
    assert f"runAsUser: {user}" in deployment


def test_cpu_torch_is_pinned_and_installed_before_the_project(instructions):
    runs = [(n, i) for n, i in enumerate(instructions) if i.keyword == "RUN"]
    torch_runs = [(n, i) for n, i in runs if "torch==" in i.args and "pip install" in i.args]
    project_runs = [(n, i) for n, i in runs if re.search(r"pip install (\S+ )*\.(\s|$)", i.args)]
    assert len(torch_runs) == 1 and len(project_runs) == 1, (torch_runs, project_runs)
    (t_at, t), (p_at, p) = torch_runs[0], project_runs[0]
    assert t_at < p_at and t.stage == p.stage
    args = arg_defaults(instructions, t.stage)
    cmd = expand(t.args, args)
    assert "torch==2.13.0" in cmd, cmd
    assert "--index-url" in cmd and "https://download.pytorch.org/whl/cpu" in cmd, cmd
    # The project's sources are copied in between, and the torch layer comes first so a
    # source change does not reinstall torch.
    copies = [n for n, i in enumerate(instructions) if i.keyword == "COPY" and i.stage == t.stage]
    assert copies and t_at < min(copies) < p_at


def test_the_default_model_is_baked_into_the_image_and_is_what_it_serves(instructions):
    # The build fetches and converts SmolLM2 (the CLI's default) into a folder named as the
    # API serves the default model, and the image serves that folder: no random model.
    fetch = [i for i in instructions if i.keyword == "RUN" and "default_model_dir()" in i.args]
    assert len(fetch) == 1, fetch
    assert "packserve.models.smollm2" in fetch[0].args
    moved = re.search(r"shutil\.move\(default_model_dir\(\), '([^']+)'\)", fetch[0].args)
    assert moved, fetch[0].args
    model_dir = moved[1]
    assert default_served_model_name(model_dir) == default_served_model_name(None)
    assert not any("make-model" in i.args for i in instructions if i.keyword == "RUN")
    final = final_stage(instructions)
    assert env_of(final).get("PACKSERVE_MODEL") == model_dir
    if fetch[0].stage != final[0].stage:  # built in an earlier stage: copied over
        copies = [i.args for i in final if i.keyword == "COPY" and "--from=" in i.args]
        assert any(model_dir.startswith(c.split()[-1]) for c in copies), copies


def test_the_runtime_image_can_compile_the_cpu_kernels(instructions):
    # The engine compiles packserve/kernels/csrc for the host's CPU on first start: the final
    # stage installs a C++ compiler (as root, before USER) and drops apt's lists.
    final = final_stage(instructions)
    at = [n for n, i in enumerate(final) if i.keyword == "RUN" and "apt-get install" in i.args]
    assert len(at) == 1, [i.args for i in final if i.keyword == "RUN"]
    words = shlex.split(final[at[0]].args)
    assert "g++" in words and "--no-install-recommends" in words
    assert "rm -rf /var/lib/apt/lists/*" in final[at[0]].args
    user_at = min(n for n, i in enumerate(final) if i.keyword == "USER")
    assert at[0] < user_at


def test_healthcheck_probes_health_with_python_only(instructions):
    checks = [i for i in final_stage(instructions) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    args = checks[0].args
    assert "CMD" in args and "/health" in args and "urllib" in args
    assert not re.search(r"\b(curl|wget)\b", args)
    cmd = json.loads(args.split("CMD", 1)[1])
    assert cmd[0] in ("python", "python3")


def test_entrypoint_serves_on_all_interfaces_port_8000(instructions):
    final = final_stage(instructions)
    assert [i.args for i in final if i.keyword == "EXPOSE"] == ["8000"]
    entry = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    argv = json.loads(entry[-1])  # exec form, so packserve gets SIGTERM itself
    assert argv[:2] == ["packserve", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert env_of(final).get("PACKSERVE_PORT", "8000") == "8000"


def test_no_latest_tags_anywhere():
    texts = [DOCKERFILE.read_text()] + [p.read_text() for p in (REPO / "deploy").rglob("*.yaml")]
    for text in texts:
        assert not re.search(r"^\s*(FROM|image:)\s*\S+:latest\b", text, re.M | re.I)


# -- .dockerignore -------------------------------------------------------------------------


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins;
    `!` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        regexes = [pat]
        if pat.startswith("**/"):
            regexes.append(pat[3:])
        if any(fnmatch.fnmatchcase(p, r) for p in prefixes for r in regexes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_copy_needs_and_drops_the_rest(instructions):
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    sources = []
    for ins in instructions:
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            words = [w for w in ins.args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(patterns, source), f".dockerignore drops {source}"
    kept = ("packserve/__init__.py", "packserve/server/app.py", "packserve/models/corpus.py")
    for f in kept:
        assert not dockerignore_excludes(patterns, f), f
    for junk in (
        ".venv/bin/python",
        ".git/HEAD",
        "models/x",
        "tests/conftest.py",
        "packserve/server/__pycache__/app.cpython-311.pyc",
        "bench/results/a.json",
    ):
        assert dockerignore_excludes(patterns, junk), f"{junk} would be sent to the builder"


def test_hadolint_finds_nothing(tool):
    hadolint = tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_context_alone_builds_the_package(instructions, tmp_path):
    """What `pip install .` sees in the image: only the files .dockerignore lets through,
    laid out as the COPYs do. It must build a wheel with the three packages and the
    `packserve` command (offline: the setuptools of this venv, no isolation)."""
    pytest.importorskip("setuptools", reason="needs setuptools to build offline")
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    context = tmp_path / "context"
    for ins in instructions:
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        *sources, dest = [w for w in ins.args.split() if not w.startswith("--")]
        for source in sources:
            src = REPO / source
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if dockerignore_excludes(patterns, rel):
                    continue
                target = context / (rel if src.is_dir() else f.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
        assert dest.startswith("./") or dest == "./", f"COPY into {dest}: not the WORKDIR"
    out = tmp_path / "wheels"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("packserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    for module in (
        "__init__.py",
        "server/app.py",
        "server/cli.py",
        "server/static/dashboard.html",
        "engine/engine.py",
        "kernels/runner.py",
        "models/model_maker.py",
        "models/corpus.py",
        "models/corpus/01-cooking.txt",
        "kernels/csrc/paged_decode.cpp",
        "scheduler/__init__.py",
    ):
        assert f"packserve/{module}" in names, module
    assert not any("__pycache__" in n for n in names)
    assert "packserve = packserve.server.cli:main" in scripts
