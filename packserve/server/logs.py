"""Logging set-up: plain text or one JSON object per line."""

from __future__ import annotations

import json
import logging
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
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "packserve": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "transformers": {"handlers": ["default"], "level": "WARNING", "propagate": False},
            "huggingface_hub": {"handlers": ["default"], "level": "WARNING", "propagate": False},
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
