"""What the HTTP handlers share: settings, metrics, the engine loop, readiness."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from packserve.engine import AsyncEngine

from .dashboard import DashboardRecorder
from .metrics import Metrics
from .protocol import APIError
from .settings import Settings
from .streams import Choice

log = logging.getLogger("packserve.requests")


@dataclass(slots=True)
class ServerState:
    """One server's shared state. `engine` is None until the model has loaded."""

    settings: Settings
    metrics: Metrics
    engine: AsyncEngine | None = None
    draining: bool = False  # SIGTERM received: not ready, no new requests
    ids: itertools.count = field(default_factory=itertools.count)  # engine request ids
    dashboard: DashboardRecorder = field(default_factory=DashboardRecorder)
    failed: bool = False  # the start failed: the process is on its way out
    on_fail: Callable[[], None] | None = None  # stops the server (set by `run`)
    # LoRA adapters served: name -> PEFT folder (--lora-modules, then loads and unloads)
    adapters: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.adapters = self.settings.engine.lora_paths

    def queue_full(self) -> bool:
        """As many requests wait as the server queues: a generation request gets 429."""
        engine = self.engine
        return engine is not None and engine.num_waiting >= self.settings.max_queued_requests

    def fail(self) -> None:
        """The server cannot serve (the model did not load): stop it."""
        self.failed = True
        if self.on_fail is not None:
            self.on_fail()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    def live_engine(self) -> AsyncEngine:
        """The engine loop, or a 503 while loading or draining."""
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if self.engine is None or not self.engine.alive:
            raise APIError(503, "the model is not ready")
        return self.engine

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request names (None: the base model, named or not); 404 for
        any other model."""
        served = self.settings.model_name
        if model is None or model == served:
            return None
        if model in self.adapters:
            return model
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )

    def finished(self, choice: Choice) -> None:
        """Once per finished choice, whatever the reason: metrics, dashboard, log line."""
        t = choice.timings()
        self.metrics.observe_request(t)
        self.dashboard.observe_request(t)
        fields: dict[str, object] = {
            "request_id": choice.request_id,
            "prompt_tokens": t.num_prompt_tokens,
            "output_tokens": t.num_generation_tokens,
            "queue_s": round((t.scheduled or t.finished) - t.arrival, 4),
            "ttft_s": round(t.first_token - t.arrival, 4) if t.first_token else None,
            "latency_s": round(t.finished - t.arrival, 4),
            "finish_reason": t.finish_reason,
        }
        if self.settings.log_prompts:
            fields["prompt_token_ids"] = choice.out.prompt_token_ids
        log.info("request finished", extra={"fields": fields})
