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


def add_config_flags(parser: argparse.ArgumentParser, cls: type, repeatable: tuple[str, ...] = ()) -> None:
    """--kebab-name for each field; its default comes from EMBER_UPPER_NAME, else the dataclass. A `repeatable`
    field's flag may be given several times (its variable: a comma-separated list)."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        kind, env_name = _field_type(cls, f), f"EMBER_{f.name.upper()}"
        env = os.environ.get(env_name)
        flag, help_ = "--" + f.name.replace("_", "-"), f"(env {env_name}; default {f.default!r})"
        if f.name in repeatable:
            default = [v.strip() for v in env.split(",") if v.strip()] if env else None
            group.add_argument(flag, dest=f.name, action="append", default=default, help=help_ + "; repeatable")
            continue
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


def model_specs(args: argparse.Namespace, server: ServerConfig) -> list:
    """The models to serve: --config's tables, then each --model (NAME=PATH, a path or a bundled name); neither:
    the bundled chat model and, when installed, the bundled embedding model."""
    from ember.serving.models import ModelSpec, default_specs

    engine = dataclasses.replace(config_from_args(EngineConfig, args), model=None)
    specs = config_file_specs(server.config, engine) if server.config else []
    specs += [ModelSpec.parse(text, engine, server.generation_config) for text in args.model or []]
    if not specs:
        specs = default_specs(engine, server.generation_config)
        if server.served_model_name:  # names the chat model
            specs[0].name = server.served_model_name
    elif server.served_model_name:
        if len(specs) > 1:
            raise ValueError("--served-model-name names one model; with several, use --model NAME=PATH")
        specs[0].name = server.served_model_name
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        raise ValueError(f"two models are served as {sorted({n for n in names if names.count(n) > 1})}")
    return specs


def config_file_specs(path: str, engine: EngineConfig) -> list:
    """`[models.<name>]` tables: `path` (a file, folder or bundled name), `generation_config` and any engine
    setting, over an optional `[engine]` table and the command line's."""
    import tomllib

    from ember.serving.models import ModelSpec

    with open(path, "rb") as f:
        data = tomllib.load(f)
    known = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}

    def engine_from(table: dict, where: str, base: EngineConfig) -> EngineConfig:
        unknown = sorted(set(table) - known - {"path", "generation_config"})
        if unknown:
            raise ValueError(f"{path}: {where} has unknown settings {unknown}; known: path, generation_config, "
                             f"{', '.join(sorted(known))}")
        return dataclasses.replace(base, **{k: v for k, v in table.items() if k in known})

    extra = sorted(set(data) - {"engine", "models"})
    if extra or not isinstance(data.get("models", {}), dict):
        raise ValueError(f"{path}: expected [engine] and [models.<name>] tables, found {extra or ['models']}")
    engine = engine_from(data.get("engine", {}), "[engine]", engine)
    specs = []
    for name, table in data.get("models", {}).items():
        model_engine = engine_from(table, f"[models.{name}]", engine)
        specs.append(ModelSpec(name, dataclasses.replace(model_engine, model=table.get("path", name)),
                               table.get("generation_config")))
    return specs


def serve(args: argparse.Namespace) -> int:
    from ember.api.app import create_app
    from ember.api.server import http_server, install_drain
    from ember.log import setup_logging
    from ember.serving.models import ModelRegistry, ServedModel, load_served_model
    from ember.store import Store

    server = config_from_args(ServerConfig, args)
    setup_logging(server.log_level)
    try:
        specs = model_specs(args, server)
    except (ValueError, OSError) as exc:
        print(f"ember serve: {exc}", file=sys.stderr)
        return 2
    store_config = config_from_args(StoreConfig, args)
    store = Store(store_config) if store_config.usage_records else None  # opened (and migrated) before the models
    models = [load_served_model(s.engine, s.name, s.generation_config) for s in specs]
    app = create_app(ModelRegistry(models, specs), server, store)
    url = f"http://{server.host}:{server.port}/v1"
    print(f"ember: serving {', '.join(m.name for m in models)} on {url}", file=sys.stderr, flush=True)
    http = http_server(app, server)
    # The first chat model's engine loop takes the main thread (torch's CPU kernels are fastest there), the other
    # models' loops get threads of their own; HTTP gets another, and the engines stop once HTTP has drained (the
    # app's lifespan shuts them down).
    main = next((m for m in models if isinstance(m, ServedModel)), models[0])
    main.engine.reserve_current_thread()
    install_drain(app, http, main.engine.shutdown)
    http_thread = threading.Thread(target=lambda: (http.run(), main.engine.shutdown()), name="ember-http",
                                   daemon=True)
    http_thread.start()
    main.engine.run()
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
    add_config_flags(parser, EngineConfig, repeatable=("model",))
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
