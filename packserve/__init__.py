"""packserve: an OpenAI-compatible LLM server with prepacked prefill and continuous batching.

The offline API::

    from packserve import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig())  # SmolLM2-135M-Instruct
    print(engine.generate(["The capital of France is"], SamplingParams(max_tokens=8))[0].text)

Imports one way: server -> engine -> kernels, models -> scheduler. The names below load on first
use, so ``import packserve.scheduler`` stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from packserve.engine import Completion, Delta, Engine, EngineConfig
    from packserve.scheduler import SamplingParams

__all__ = ["Completion", "Delta", "Engine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "SamplingParams":
        from packserve.scheduler import SamplingParams

        return SamplingParams
    if name in __all__:
        import packserve.engine

        return getattr(packserve.engine, name)
    raise AttributeError(f"module 'packserve' has no attribute {name!r}")
