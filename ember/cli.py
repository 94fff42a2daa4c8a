"""`ember serve` and `ember bench`. Every config dataclass field is a flag and an EMBER_* variable."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from ember.api.config import ServerConfig
from ember.engine.config import EngineConfig


def _field_type(cls, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):  # `X | None`
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """--kebab-name for each field; the default comes from EMBER_UPPER_NAME, else the dataclass."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        env = os.environ.get(f"EMBER_{f.name.upper()}")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            default = f.default if env is None else env.lower() in ("1", "true", "yes", "on")
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        else:
            default = f.default if env is None else kind(env)
            group.add_argument(flag, dest=f.name, type=kind, default=default,
                               help=f"(env EMBER_{f.name.upper()}; default {f.default!r})")


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ember.api.app import create_app
    from ember.log import setup_logging
    from ember.serving.models import ModelRegistry, load_served_model

    server = config_from_args(ServerConfig, args)
    engine = config_from_args(EngineConfig, args)
    setup_logging(server.log_level)
    model = load_served_model(engine, server.served_model_name, server.generation_config)
    app = create_app(ModelRegistry([model]))
    print(f"ember: serving {model.name} on http://{server.host}:{server.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember", description="Fireworks/OpenAI-compatible LLM server")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve a model over HTTP")
    add_config_flags(p_serve, ServerConfig)
    add_config_flags(p_serve, EngineConfig)
    p_serve.set_defaults(func=serve)
    sub.add_parser("bench", help="load-test any OpenAI-compatible server (ember bench --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


def bench(argv: list[str]) -> int:
    """Its own parser, imported lazily: the load generator is not needed to serve."""
    from ember import bench as bench_module

    parser = argparse.ArgumentParser(prog="ember bench", description=bench_module.__doc__)
    bench_module.add_arguments(parser)
    return bench_module.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
