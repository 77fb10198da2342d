"""packserve engine: scheduler + runner + text, stepped by one thread; the offline API.

The names below load on first use, so `packserve.engine.config` (the settings' source) is
importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .async_engine import AsyncEngine
    from .config import EngineConfig
    from .engine import Engine
    from .outputs import Completion, Delta
    from .stats import EngineInfo, EngineLoad, RunningRequest, StepStats

_HOMES = {
    "AsyncEngine": "async_engine",
    "Completion": "outputs",
    "Delta": "outputs",
    "Engine": "engine",
    "EngineConfig": "config",
    "EngineInfo": "stats",
    "EngineLoad": "stats",
    "RunningRequest": "stats",
    "StepStats": "stats",
}
__all__ = [
    "AsyncEngine",
    "Completion",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineInfo",
    "EngineLoad",
    "RunningRequest",
    "StepStats",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'packserve.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
