"""The models this server serves: engine, tokenizer and sampling defaults, by name."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ember.engine.config import EngineConfig
from ember.engine.engine import AsyncEngine, build_async_engine, resolve_device
from ember.models.loader import default_model_path, load_model
from ember.models.tokenizer import Tokenizer
from ember.serving.errors import RequestError

log = logging.getLogger("ember.serving")

FIREWORKS_PREFIX = "accounts/fireworks/models/"
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"
# generation_config.json keys that set sampling defaults
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k")


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    sampling_defaults: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


def load_served_model(engine_config: EngineConfig, served_name: str | None = None,
                      generation_config: str | None = None) -> ServedModel:
    path = Path(engine_config.model) if engine_config.model else default_model_path()
    _, dtype = resolve_device(engine_config)
    started = time.perf_counter()
    weights, tokenizer = load_model(path, dtype)
    gen = dict(weights.generation_config)
    if generation_config:
        gen.update(json.loads(Path(generation_config).read_text()))
    eos = sorted(set(tokenizer.eos_token_ids) | set(weights.config.eos_token_ids))
    engine = build_async_engine(engine_config, weights, eos)
    name = served_name or (DEFAULT_SERVED_NAME if engine_config.model is None else path.stem.lower())
    defaults = {k: gen[k] for k in SAMPLING_DEFAULT_KEYS if gen.get(k) is not None}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    log.info("model loaded", extra={"model": name, "path": str(path),
                                    "seconds": round(time.perf_counter() - started, 2)})
    return ServedModel(name, engine, tokenizer, defaults)


class ModelRegistry:
    """Resolves request model ids, including Fireworks' `accounts/fireworks/models/<name>` form."""

    def __init__(self, models: list[ServedModel]) -> None:
        self.models = {m.name: m for m in models}

    def get(self, model_id: str) -> ServedModel:
        name = model_id.removeprefix(FIREWORKS_PREFIX)
        model = self.models.get(name)
        if model is None:
            raise RequestError(f"model `{model_id}` not found; available: {sorted(self.models)}", "model",
                               status=404, code="model_not_found")
        return model

    def __iter__(self):
        return iter(self.models.values())
