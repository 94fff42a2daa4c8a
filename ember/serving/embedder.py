"""Embedding models: an encoder and its tokenizer behind a worker thread that batches inputs across requests.

Every input of every request waiting when the worker wakes forms one window; the window is sorted by priority
(OpenAI's service_tier: batch jobs' `flex` lines last), then length (so rows padded together are close in length)
and cut into forward passes of at most MAX_BATCH_TOKENS padded tokens. Inputs arriving meanwhile wait for the
next window. Results go back to each caller's asyncio future with one `call_soon_threadsafe` per event loop and
pass. No KV cache: an input is done after one pass.

The encoder is a BERT folder's (load_embedding_model) or a loaded chat model's, pooled as vLLM pools decoders
(decoder_embedding_model, over ember.models.decoder_encoder): the same engine batches either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from tokenizers import Tokenizer

from ember.engine.config import EngineConfig
from ember.engine.loop_thread import LoopThread
from ember.models.bert import BertEncoder, load_bert
from ember.models.decoder_encoder import DecoderEncoder
from ember.models.gemma3 import Gemma3Model
from ember.models.llama import LlamaModel
from ember.models.tokenizer import Tokenizer as ChatTokenizer
from ember.serving.admission import Admission
from ember.serving.errors import RequestError

log = logging.getLogger("ember.serving")

# padded tokens of one forward pass: large enough that short inputs share a pass by the hundred, small enough
# that one pass of long inputs (attention is quadratic) stays well under a second on a few cores
MAX_BATCH_TOKENS = 8192


@dataclass
class _Input:
    ids: list[int]
    priority: int  # lower first, as the generation engine orders requests
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _batches(window: list[_Input], max_tokens: int) -> Iterator[list[_Input]]:
    """Consecutive runs of the sorted window whose padded size (rows x longest) fits max_tokens."""
    batch: list[_Input] = []
    longest = 0
    for item in window:
        widest = max(longest, len(item.ids))
        if batch and (len(batch) + 1) * widest > max_tokens:
            yield batch
            batch, widest = [], len(item.ids)
        batch.append(item)
        longest = widest
    if batch:
        yield batch


def _resolve(results: list[tuple[_Input, np.ndarray | BaseException]]) -> None:
    for item, value in results:
        if item.future.done():  # the request went away
            continue
        if isinstance(value, BaseException):
            item.future.set_exception(value)
        else:
            item.future.set_result(value)


class EmbeddingEngine(LoopThread):
    """The encoder's loop, off the event loop where ember.engine.loop_thread places it, as AsyncEngine's is, so
    `ember serve` runs either kind alike."""

    thread_name = "ember-embedder"

    def __init__(self, encoder: BertEncoder | DecoderEncoder, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 max_model_len: int | None = None, torch_threads: int | None = None) -> None:
        super().__init__(torch_threads)
        self.encoder = encoder
        # a chat model's is its served context (the engine's), which may be shorter than its positions
        self.max_model_len = max_model_len or encoder.config.max_position_embeddings
        self.max_batch_tokens = max(max_batch_tokens, self.max_model_len)  # the longest input fits one pass
        self._lock = threading.Lock()
        self._pending: list[_Input] = []
        self._running = 0
        # requests, inputs and their tokens; steps = forward passes, padded_tokens = what those passes computed
        self.counters = {"requests": 0, "inputs": 0, "prompt_tokens": 0, "steps": 0, "padded_tokens": 0}

    def stats(self) -> dict[str, int]:
        return {**self.counters, "num_running": self._running, "num_waiting": len(self._pending)}

    async def embed(self, inputs: list[list[int]], priority: int = 0) -> list[np.ndarray]:
        """One float32 vector per input (the model's pooled output), computed with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        items = [_Input(ids, priority, loop, loop.create_future()) for ids in inputs]
        with self._lock:
            self._pending.extend(items)
            self.counters["requests"] += 1
            self.counters["inputs"] += len(items)
            self.counters["prompt_tokens"] += sum(len(ids) for ids in inputs)
        self._wake.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                window, self._pending = self._pending, []
            window = sorted((item for item in window if not item.future.done()),
                            key=lambda item: (item.priority, len(item.ids)))
            if not window:
                self._wake.wait()
                self._wake.clear()
                continue
            self._running = len(window)
            for batch in _batches(window, self.max_batch_tokens):
                self._deliver(batch, self._forward(batch))
                self._running -= len(batch)
        with self._lock:  # stopped (the model unloaded, the server stopping): no caller waits for a gone loop
            left, self._pending = self._pending, []
        if left:
            self._deliver(left, RuntimeError("the model was unloaded"))

    def _forward(self, batch: list[_Input]) -> list[np.ndarray] | BaseException:
        try:
            vectors = self.encoder.encode([item.ids for item in batch]).numpy()
        except Exception as exc:  # a bug: fail the batch's requests rather than hang them
            log.exception("embedding forward pass failed")
            return RuntimeError(f"engine failure: {exc}")
        self.counters["steps"] += 1
        self.counters["padded_tokens"] += len(batch) * max(len(item.ids) for item in batch)
        return list(vectors)

    @staticmethod
    def _deliver(batch: list[_Input], vectors: list[np.ndarray] | BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Input, np.ndarray | BaseException]]] = {}
        for row, item in enumerate(batch):
            value = vectors if isinstance(vectors, BaseException) else vectors[row]
            by_loop.setdefault(item.loop, []).append((item, value))
        for loop, results in by_loop.items():
            loop.call_soon_threadsafe(_resolve, results)


@dataclass
class EmbeddingModel:
    """A served embedding model: what /v1/embeddings needs, and what the registry, admission, metrics and the
    server's lifespan read of every served model (name, engine, admission, max_num_seqs)."""

    capabilities: ClassVar[tuple[str, ...]] = ("embeddings",)

    name: str
    engine: EmbeddingEngine
    tokenizer: Tokenizer | ChatTokenizer  # a BERT folder's tokenizer.json, or a chat model's
    max_num_seqs: int  # requests embedding at once; admission lets a bounded line wait beyond them
    created: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(default_factory=Admission)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def dimensions(self) -> int:
        return self.engine.encoder.dimensions

    @property
    def normalizes(self) -> bool:
        """Whether the model's own output is unit length (sentence-transformers' Normalize module)."""
        return self.engine.encoder.pooling.normalize

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """With the model's special tokens ([CLS] ... [SEP]; a chat model's BOS where its completions get one, no
        chat template), off the event loop (the tokenizer frees the GIL)."""
        tokenizer = self.tokenizer
        if isinstance(tokenizer, ChatTokenizer):
            return await asyncio.to_thread(lambda: [tokenizer.encode(text) for text in texts])
        encodings = await asyncio.to_thread(tokenizer.encode_batch, texts)
        return [e.ids for e in encodings]

    def truncate(self, text: str, max_tokens: int | None = None) -> str:
        """The text's first `max_tokens` tokens (default: as many as fit the model beside its special tokens): what
        a prompt_template's `truncate_tokens` gives."""
        tokenizer = self.tokenizer
        if isinstance(tokenizer, ChatTokenizer):
            ids, reserved = tokenizer.encode(text, add_special_tokens=False), len(tokenizer.encode(""))
        else:
            encoding, reserved = tokenizer.encode(text, add_special_tokens=False), len(tokenizer.encode("").ids)
            ids = encoding.ids
        keep = max(0, self.max_model_len - reserved if max_tokens is None else max_tokens)
        if len(ids) <= keep:
            return text
        if isinstance(tokenizer, ChatTokenizer):
            return tokenizer.decode(ids[:keep])
        return text[:encoding.offsets[keep - 1][1]] if keep else ""

    def check(self, inputs: list[list[int]]) -> None:
        """Every input fits the model's positions and vocabulary, else a 400 naming `input`."""
        vocab = self.engine.encoder.config.vocab_size
        for i, ids in enumerate(inputs):
            if not ids:  # text a chat tokenizer turns into nothing (a BERT input has [CLS] and [SEP] at least)
                raise RequestError(f"input {i} has no tokens", "input")
            if len(ids) > self.max_model_len:
                raise RequestError(f"input {i} has {len(ids)} tokens; this model takes at most {self.max_model_len}",
                                   "input", code="context_length_exceeded")
            if max(ids) >= vocab:
                raise RequestError(f"input {i} has token id {max(ids)}; this model's vocabulary has {vocab}", "input")


def load_embedding_model(engine_config: EngineConfig, path: Path, name: str) -> EmbeddingModel:
    """A BERT folder with its tokenizer.json, on the CPU in float32 whatever the device setting."""
    if engine_config.device not in ("auto", "cpu"):
        raise ValueError(f"embedding models run on the CPU; --device {engine_config.device} is not supported")
    started = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_truncation()  # an input too long is refused, never silently cut
    tokenizer.no_padding()  # the engine pads each batch to its own longest input
    engine = EmbeddingEngine(load_bert(path), torch_threads=engine_config.threads or len(os.sched_getaffinity(0)))
    model = EmbeddingModel(name, engine, tokenizer, engine_config.max_num_seqs)
    log.info("model loaded", extra={"model": name, "path": str(path), "kind": "embeddings",
                                    "seconds": round(time.perf_counter() - started, 2)})
    return model


def decoder_embedding_model(name: str, model: LlamaModel | Gemma3Model, tokenizer: ChatTokenizer, max_model_len: int,
                            pooling: str = "last", *, max_num_seqs: int = EngineConfig.max_num_seqs,
                            max_batch_tokens: int = MAX_BATCH_TOKENS, torch_threads: int | None = None
                            ) -> EmbeddingModel:
    """A served chat model's embeddings (its weights shared, none of its KV cache used), in an engine of their own
    that the caller starts (`.engine.start()`) and shuts down with the chat model."""
    encoder = DecoderEncoder(model, max_model_len, pooling)
    engine = EmbeddingEngine(encoder, max_batch_tokens, max_model_len, torch_threads)
    return EmbeddingModel(name, engine, tokenizer, max_num_seqs)
