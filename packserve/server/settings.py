"""Settings: the only place that reads the command line and the environment.

The flags are generated from the config dataclasses' fields (their defaults and help text live
there, once): `--some-field` for the field `some_field`, unless the field names its flag. Every
flag may also be given as the environment variable `PACKSERVE_SOME_FIELD`; the command line
wins. A bad value, on either, stops the program with a message naming the flag or variable.
"""

from __future__ import annotations

import argparse
import os
import types
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from packserve.engine.config import EngineConfig, check_choices, knob
from packserve.engine.reasoning import ReasoningParserName

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class Settings:
    """The HTTP service's settings; `engine` holds the engine's. Validated on construction."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = knob(
        None,
        "model name in the API (default: the folder's name, a .gguf file's stem, or "
        "SmolLM2-135M-Instruct for the default model)",
    )
    host: str = knob("127.0.0.1", "address to listen on")
    port: int = knob(8000, "port to listen on")
    api_key: str | None = field(
        default=None, repr=False, metadata={"help": "require 'Authorization: Bearer KEY' on /v1"}
    )
    max_queued_requests: int = knob(256, "waiting requests beyond this get 429")
    request_timeout_s: float | None = knob(
        None, "seconds before a request is aborted (default: none)", flag="request-timeout"
    )
    shutdown_timeout_s: float = knob(
        30.0, "seconds in-flight requests get on SIGTERM", flag="shutdown-timeout"
    )
    max_body_bytes: int = knob(1 << 20, "largest request body accepted")
    header_timeout_s: float = knob(
        10.0, "seconds a connection has to send a request's headers", flag="header-timeout"
    )
    body_timeout_s: float = knob(
        30.0, "seconds a request has to send its body (then 408)", flag="body-timeout"
    )
    keep_alive_timeout_s: int = knob(
        5, "seconds an idle keep-alive connection stays open", flag="keep-alive-timeout"
    )
    stall_timeout_s: float = knob(
        30.0,
        "seconds a streamed response waits for a client that stopped reading before the "
        "connection is dropped and the request aborted",
        flag="stall-timeout",
    )
    max_connections: int = knob(
        0, "open connections at most, then 503 (0: the file-descriptor limit less 64)"
    )
    engine_process: bool = knob(
        True,
        "run the engine loop in a process of its own (no GIL shared with the HTTP side); "
        "false: in a thread of the server process",
    )
    log_format: Literal["text", "json"] = knob("text", "log line format")
    log_prompts: bool = knob(False, "include prompt token ids in request logs")
    allow_unknown_fields: bool = knob(
        False,
        "ignore request fields this server does not know (logged once per name) instead of "
        "answering 400; fields it knows and does not implement are refused either way",
    )
    tool_call_parser: Literal["auto", "hermes", "smollm2"] = knob(
        "auto",
        "how tool calls are written and parsed: hermes (<tool_call> one JSON object </tool_call>,"
        " Qwen2.5/Qwen3) or smollm2 (<tool_call> a JSON list of calls </tool_call>); auto: "
        "smollm2 for SmolLM2's chat template, else hermes",
    )
    reasoning_parser: ReasoningParserName = knob(
        "none",
        "split chat output into message.reasoning_content and content: qwen3 (a <think> ... "
        "</think> block before the answer, Qwen3 and DeepSeek-R1 style); none: all content",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.max_queued_requests < 1 or self.max_body_bytes < 1:
            raise ValueError("max_queued_requests and max_body_bytes must be positive")
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must be >= 0")
        timeouts = ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "stall_timeout_s")
        for name in timeouts:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections < 0:
            raise ValueError("max_connections must be 0 (from the descriptor limit) or positive")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")

    @property
    def model_name(self) -> str:
        """The model's name in the API."""
        return self.served_model_name or default_served_model_name(self.engine.model)


def default_served_model_name(model: str | None) -> str:
    """The API's model name when none is given: SmolLM2-135M-Instruct for the default model
    (``model`` None), a .gguf file's stem, else the folder's or hub id's last part."""
    if model is None:
        from packserve.models.smollm2 import MODEL_NAME

        return MODEL_NAME
    base = os.path.basename(os.path.normpath(model))
    return base[: -len(".gguf")] if base.lower().endswith(".gguf") else base


# -- flags from fields --------------------------------------------------------------------------


def flag_name(f: Field) -> str:
    return f.metadata.get("flag", f.name.replace("_", "-"))


def env_name(f: Field) -> str:
    return "PACKSERVE_" + flag_name(f).upper().replace("-", "_")


def _scalar(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """The type a flag parses to, and its choices: `int | None` -> int, Literal -> str."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return str, get_args(annotation)
    return annotation, None


def _is_list(annotation: Any) -> bool:
    """`tuple[str, ...]` fields take several values: `--flag a b`, or `PACKSERVE_FLAG="a b"`."""
    return get_origin(annotation) is tuple


def _from_env(f: Field, kind: type, choices: tuple[str, ...] | None, raw: str) -> Any:
    if _is_list(kind):
        return tuple(raw.split())
    if kind is bool:
        if raw.lower() not in TRUE + FALSE:
            raise ValueError(f"expected one of {', '.join(TRUE + FALSE)}")
        return raw.lower() in TRUE
    if raw == "" and f.default is None:
        return None
    value = kind(raw)
    if choices and value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    return value


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass `cls` (nested dataclasses flattened), with
    its default taken from the environment when the matching variable is set."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            add_config_flags(parser, hints[f.name])
            continue
        kind, choices = _scalar(hints[f.name])
        default = f.default if f.default is not MISSING else None
        env = env_name(f)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = _from_env(f, kind, choices, raw)
            except ValueError as exc:
                parser.error(f"{env}={raw!r}: {exc}")
        help = f.metadata.get("help", "")
        if default is not None and f.repr and "default" not in help:
            help += f" (default: {default})"
        options: dict[str, Any] = {
            "default": default,
            "dest": f.name,
            "help": f"{help} [env {env}]",
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif _is_list(kind):
            options.update(nargs="*", metavar=f.name.rsplit("_", 1)[-1].upper())
        else:
            options.update(type=kind, choices=choices)
        parser.add_argument(f"--{flag_name(f)}", **options)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass `cls` built from flags added by `add_config_flags`."""
    hints = get_type_hints(cls)
    values = {
        f.name: config_from_args(hints[f.name], args)
        if is_dataclass(hints[f.name])
        else tuple(getattr(args, f.name))
        if _is_list(hints[f.name])
        else getattr(args, f.name)
        for f in fields(cls)
    }
    return cls(**values)
