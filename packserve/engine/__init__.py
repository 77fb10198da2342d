"""packserve engine: scheduler + runner + text, stepped by one thread; the offline API."""

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import Engine
from .outputs import Completion, Delta
from .stats import EngineInfo, EngineLoad, RunningRequest, StepStats

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
