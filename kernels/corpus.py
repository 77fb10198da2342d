"""Deterministic English-ish text found on any Debian + CPython 3.11 machine.

Used to train the tokenizer of the offline default model. Only files that ship with the
OS image and the CPython standard library are read (never ``site-packages``, whose content
differs between machines), in sorted order, so every machine built from the same image
produces exactly the same documents.

One document per file: a license text from ``/usr/share/common-licenses`` verbatim, or the
docstrings and ``#`` comments of one standard-library module joined by blank lines.
"""

from __future__ import annotations

import inspect
import re
import sysconfig
from pathlib import Path

LICENSES_DIR = Path("/usr/share/common-licenses")

# Directory names in the stdlib that hold tests (mostly code and fixtures, not prose) or
# third-party packages (machine-dependent).
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

# A triple-quoted string (docstrings and long literals) or a whole-line comment. A regex
# instead of ast/tokenize keeps the scan of the stdlib well under a second.
_PROSE_RE = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'|^[ \t]*#[ \t]?([^\n]*)$', re.S | re.M)


def _license_documents() -> list[str]:
    """License texts, skipping symlinks (GPL -> GPL-3 etc.) to avoid duplicates."""
    if not LICENSES_DIR.is_dir():
        return []
    paths = sorted(p for p in LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink())
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def _stdlib_sources() -> list[Path]:
    """Sorted ``.py`` files of the CPython standard library, tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = (
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def extract_prose(source: str) -> str:
    """Return the docstrings and comments of Python ``source`` as plain text.

    Consecutive comment lines are merged into one paragraph; docstrings are dedented.
    Shebangs, coding cookies and comment-only separators (``####``) are dropped.
    """
    paragraphs: list[str] = []
    comment_run: list[str] = []
    for match in _PROSE_RE.finditer(source):
        doc = match.group(1) if match.group(1) is not None else match.group(2)
        if doc is None:
            line = match.group(3).strip()
            if line and not line.startswith(("!", "-*-")) and re.search(r"[A-Za-z]", line):
                comment_run.append(line)
            continue
        if comment_run:
            paragraphs.append(" ".join(comment_run))
            comment_run = []
        text = inspect.cleandoc(doc)
        if re.search(r"[A-Za-z]{3}", text):
            paragraphs.append(text)
    if comment_run:
        paragraphs.append(" ".join(comment_run))
    return "\n\n".join(paragraphs)


def corpus_documents(max_bytes: int = 4_000_000) -> list[str]:
    """Return deterministic real-text documents totalling at most ``max_bytes`` UTF-8 bytes.

    License texts come first, then one document per stdlib module (its docstrings and
    comments), in sorted path order. The last document is truncated to fit the budget.
    """
    documents: list[str] = []
    used = 0

    def add(doc: str) -> bool:
        nonlocal used
        encoded = doc.encode("utf-8")
        if used + len(encoded) > max_bytes:
            # Cut on a byte budget, then drop a possibly split trailing character.
            doc = encoded[: max_bytes - used].decode("utf-8", errors="ignore")
            encoded = doc.encode("utf-8")
        if doc:
            documents.append(doc)
            used += len(encoded)
        return used < max_bytes

    for doc in _license_documents():
        if not add(doc):
            return documents
    for path in _stdlib_sources():
        prose = extract_prose(path.read_text(encoding="utf-8", errors="replace"))
        if prose and not add(prose):
            return documents
    return documents
