"""Logging set-up: plain text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a record's `fields` extra is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`time level logger message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        return super().format(record) + extra


class RateLimit(logging.Filter):
    """At most `burst` records per logger and message in any `window_s` seconds, for
    warnings and errors and for the connection edge's lines (what an attacker can trigger at
    will); the next record let through counts the ones dropped. A message is its first line
    (asyncio's name the callback there and its handle, timestamped, below). Request and
    access lines are not limited: they are one per request served."""

    def __init__(self, burst: int = 20, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, object], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not record.name.startswith(LIMITED_LOGGERS):
            return True
        key = (record.name, str(record.msg).partition("\n")[0])
        now = time.monotonic()
        start, count, dropped = self._seen.get(key, (now, 0, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        if count >= self.burst:
            self._seen[key] = (start, count, dropped + 1)
            return False
        if dropped:
            record.fields = {**getattr(record, "fields", {}), "dropped_similar": dropped}
        if len(self._seen) > 1024:  # many distinct messages: start over rather than grow
            self._seen.clear()
        self._seen[key] = (start, count + 1, 0)
        return True


LIMITED_LOGGERS = ("packserve.connections",)


def configure_logging(log_format: str) -> dict[str, Any]:
    """Route our loggers and uvicorn's through one handler; returns uvicorn's log_config."""
    formatter = (
        "packserve.server.logs.JsonFormatter"
        if log_format == "json"
        else ("packserve.server.logs.TextFormatter")
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "filters": {"rate_limit": {"()": "packserve.server.logs.RateLimit"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["rate_limit"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "packserve": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "transformers": {"handlers": ["default"], "level": "WARNING", "propagate": False},
            "huggingface_hub": {"handlers": ["default"], "level": "WARNING", "propagate": False},
            "asyncio": {"handlers": ["default"], "level": "WARNING", "propagate": False},
        },
    }


def quiet_libraries() -> None:
    """transformers and huggingface_hub write progress bars and keep their own stderr
    handler: off, so every line on stderr is one of our log records (one JSON object each
    with --log-format json)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.disable_default_handler()


def setup_engine_process(log_format: str) -> None:
    """First thing in the engine's own process: the server's log lines, libraries quiet."""
    logging.config.dictConfig(configure_logging(log_format))
    quiet_libraries()
