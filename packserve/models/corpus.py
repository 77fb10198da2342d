"""The tokenizer corpus of the built-in models: text written for this project, shipped in
``kernels/corpus/`` (24 documents, ~150 KB: prose, computing, code, numbers, chat).

It is part of the repository, not read from the machine, so the tokenizer trained on it,
and with it every built-in model, is byte-identical on every machine.
"""

from __future__ import annotations

from pathlib import Path

CORPUS_DIR = Path(__file__).with_name("corpus")


def corpus_documents() -> list[str]:
    """The corpus documents, one per file, in file-name order."""
    return [p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.txt"))]
