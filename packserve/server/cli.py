"""The `packserve` command: serve, make-model, generate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _make_model(args: argparse.Namespace) -> None:
    from packserve.models.model_maker import make_model

    path = make_model(Path(args.dir), size=args.size, seed=args.seed, family=args.family)
    print(path)


def _generate(args: argparse.Namespace) -> None:
    """Offline: run prompts through the engine and print one JSON line per completion."""
    from packserve.engine.engine import Engine
    from packserve.scheduler import SamplingParams

    from .settings import engine_config_from_args

    engine = Engine(engine_config_from_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for c in engine.generate(args.prompts, params):
        print(
            json.dumps(
                {
                    "prompt": engine.tokenizer.decode(c.prompt_token_ids),
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "tokens": len(c.token_ids),
                }
            )
        )


def _serve(args: argparse.Namespace) -> None:
    from .app import run
    from .settings import settings_from_args

    run(settings_from_args(args))


def main(argv: list[str] | None = None) -> None:
    from .settings import add_engine_args, add_server_args

    parser = argparse.ArgumentParser(prog="packserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=_serve)

    make = commands.add_parser("make-model", help="build a random-weight model folder offline")
    make.add_argument("dir")
    make.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--family", choices=["llama", "mistral", "qwen2", "qwen3"], default="llama")
    make.set_defaults(func=_make_model)

    gen = commands.add_parser("generate", help="offline: complete prompts and print JSON lines")
    add_engine_args(gen)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(func=_generate)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
