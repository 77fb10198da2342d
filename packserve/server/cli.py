"""The `packserve` command: serve, make-model, generate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from packserve.engine.config import EngineConfig

from .settings import Settings, add_config_flags, config_from_args


def _make_model(args: argparse.Namespace, config: None) -> None:
    from packserve.models.model_maker import make_model

    path = make_model(Path(args.dir), size=args.size, seed=args.seed, family=args.family)
    print(path)


def _generate(args: argparse.Namespace, config: EngineConfig) -> None:
    """Offline: run prompts through the engine and print one JSON line per completion."""
    from packserve.engine import Engine
    from packserve.scheduler import SamplingParams

    engine = Engine(config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for c in engine.generate(args.prompts, params):
        line = {
            "prompt": engine.tokenizer.decode(list(c.prompt_token_ids)),
            "text": c.text,
            "finish_reason": c.finish_reason,
            "tokens": len(c.token_ids),
        }
        print(json.dumps(line))


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    import logging.config

    from .connections import listen
    from .logs import configure_logging

    logging.config.dictConfig(configure_logging(settings.log_format))
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        logging.getLogger("packserve.server").error(
            f"startup failed: cannot listen on {where}: {exc}"
        )
        sys.exit(1)
    link = None
    if settings.engine_process:  # spawned first: its imports overlap the server's own
        from functools import partial

        from packserve.engine.process import ProcessLink

        from .logs import setup_engine_process

        link = ProcessLink(settings.engine, partial(setup_engine_process, settings.log_format))
        link.spawn()
    from .app import run  # torch and the rest: after the port is ours

    run(settings, sock, link)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="packserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_config_flags(serve, Settings)
    serve.set_defaults(func=_serve, config=Settings)

    make = commands.add_parser("make-model", help="build a random-weight model folder offline")
    make.add_argument("dir")
    make.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--family", choices=["llama", "mistral", "qwen2", "qwen3"], default="llama")
    make.set_defaults(func=_make_model, config=None)

    gen = commands.add_parser("generate", help="offline: complete prompts and print JSON lines")
    add_config_flags(gen, EngineConfig)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(func=_generate, config=EngineConfig)

    args = parser.parse_args(argv)
    if args.command != "serve":  # the server sets up its own log format
        logging.basicConfig(level=logging.INFO, format="packserve: %(message)s")
    config = None
    if args.config is not None:
        try:  # the configs validate themselves: a bad value is a usage error, not a traceback
            config = config_from_args(args.config, args)
        except ValueError as exc:
            parser.error(str(exc))
    args.func(args, config)


if __name__ == "__main__":
    main()
