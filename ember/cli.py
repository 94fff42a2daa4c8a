"""`ember serve`, `ember bench` and `ember batch`. Every config dataclass field is a flag and an EMBER_* variable.

Heavy modules (torch, fastapi, the model) are imported inside the commands, so `--help` is instant
and a server is ready as soon as its model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import types
import typing

from ember.api.config import ServerConfig
from ember.engine.config import EngineConfig
from ember.store.config import StoreConfig

_TRUE = ("1", "true", "yes", "on")


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):  # `X | None`
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """--kebab-name for each field; its default comes from EMBER_UPPER_NAME, else the dataclass."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        kind, env_name = _field_type(cls, f), f"EMBER_{f.name.upper()}"
        env = os.environ.get(env_name)
        flag, help_ = "--" + f.name.replace("_", "-"), f"(env {env_name}; default {f.default!r})"
        if kind is bool:
            default = f.default if env is None else env.lower() in _TRUE
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_)
            continue
        try:
            default = f.default if env is None else kind(env)
        except ValueError:
            parser.error(f"{env_name}={env!r} is not a valid {kind.__name__}")
        group.add_argument(flag, dest=f.name, type=kind, default=default, help=help_)


def config_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def serve(args: argparse.Namespace) -> int:
    from ember.api.app import create_app
    from ember.api.server import http_server, install_drain
    from ember.log import setup_logging
    from ember.serving.models import ModelRegistry, load_served_model
    from ember.store import Store

    server = config_from_args(ServerConfig, args)
    engine = config_from_args(EngineConfig, args)
    setup_logging(server.log_level)
    store_config = config_from_args(StoreConfig, args)
    store = Store(store_config) if store_config.usage_records else None  # opened (and migrated) before the model
    model = load_served_model(engine, server.served_model_name, server.generation_config)
    app = create_app(ModelRegistry([model]), server, store)
    url = f"http://{server.host}:{server.port}/v1"
    print(f"ember: serving {model.name} on {url}", file=sys.stderr, flush=True)
    http = http_server(app, server)
    # The engine loop takes the main thread (torch's CPU kernels are fastest there); HTTP gets another,
    # and the engine stops once HTTP has drained (the app's lifespan shuts it down).
    model.engine.reserve_current_thread()
    install_drain(app, http, model.engine.shutdown)
    http_thread = threading.Thread(target=lambda: (http.run(), model.engine.shutdown()), name="ember-http",
                                   daemon=True)
    http_thread.start()
    model.engine.run()
    http_thread.join(timeout=10)
    return 0


def bench(argv: list[str]) -> int:
    """The load generator lives in ember.bench and is imported only here."""
    from ember import bench as bench_module

    parser = argparse.ArgumentParser(prog="ember bench", description=bench_module.__doc__)
    bench_module.add_arguments(parser)
    return bench_module.run(parser.parse_args(argv)) or 0


def batch(argv: list[str]) -> int:
    """The batch file runner lives in ember.batch_cli and is imported only here."""
    from ember import batch_cli

    return batch_cli.run(batch_cli.build_parser().parse_args(argv))


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember serve", description="serve a model over HTTP "
                                     "(Fireworks- and OpenAI-compatible)")
    add_config_flags(parser, ServerConfig)
    add_config_flags(parser, EngineConfig)
    add_config_flags(parser, StoreConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": lambda rest: serve(serve_parser().parse_args(rest)), "bench": bench, "batch": batch}
    if not argv or argv[0] not in commands:
        print("usage: ember {serve,bench,batch} [options]   (ember <command> --help for options)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
