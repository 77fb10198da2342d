"""packserve engine: scheduler + runner + text, stepped by one thread; the offline API."""

from .engine import Completion, Delta, Engine, EngineConfig

__all__ = ["Completion", "Delta", "Engine", "EngineConfig"]
