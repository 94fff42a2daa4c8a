"""POST /v1/embeddings as OpenAI and Fireworks define it: strings or token ids in, one vector per input out (float
or base64 of little-endian float32, as OpenAI's SDK decodes it), Matryoshka `dimensions`, Fireworks' `normalize`
and `prompt_template` (strings or objects fill it first).
Inputs of concurrent requests share forward passes in the model's engine (ember.serving.embedder)."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from ember.api.protocol import NOT_YET_SUPPORTED, TokenIds, _Strict
from ember.api.records import record
from ember.serving.embedder import EmbeddingModel
from ember.serving.errors import FieldError, RequestError
from ember.serving.prompt_template import render_prompts
from ember.serving.sampling import TIER_PRIORITY

router = APIRouter()

MAX_INPUTS = 2048  # items of one request (OpenAI's and Fireworks' limit)
# Fireworks' `return_logits` answers a classifier head's logits, which these models have none of
EMBEDDING_NOT_YET_SUPPORTED: dict[str, tuple] = {**NOT_YET_SUPPORTED, "return_logits": ()}
Structured = dict[str, Any]  # an input object whose fields fill `prompt_template`


class EmbeddingRequest(_Strict):
    not_yet: ClassVar[dict[str, tuple]] = EMBEDDING_NOT_YET_SUPPORTED

    model: str
    input: str | list[str] | TokenIds | list[TokenIds] | Structured | list[Structured]
    dimensions: Annotated[int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    normalize: bool | None = None  # Fireworks: unit length whatever the model gives (a model's own stays)
    prompt_cache_isolation_key: str | None = None  # Fireworks': no effect, embeddings keep no cache
    prompt_template: Annotated[str, Field(min_length=1, max_length=65536)] | None = None  # serving.prompt_template
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None  # batch lines: flex

    @model_validator(mode="after")
    def _check_input(self) -> EmbeddingRequest:
        items = self.input if isinstance(self.input, list) else [self.input]
        if not items:
            raise FieldError("input", "`input` must not be an empty list")
        if len(items) > MAX_INPUTS:
            raise FieldError("input", f"`input` has {len(items)} items; at most {MAX_INPUTS}")
        if any(item == "" for item in items):
            raise FieldError("input", "`input` must not contain an empty string")
        if self.prompt_template is None and any(isinstance(item, dict) for item in items):
            raise FieldError("input", "input objects fill a `prompt_template`: send one, or send strings")
        if self.prompt_template is not None and self.texts is None:
            raise FieldError("prompt_template", "`prompt_template` fills text from strings or objects, not token ids")
        return self

    @property
    def texts(self) -> list[str | Structured] | None:
        """The inputs as strings (or objects, for the template), or None when they are token ids."""
        if isinstance(self.input, str | dict):
            return [self.input]
        return self.input if isinstance(self.input[0], str | dict) else None

    @property
    def token_ids(self) -> list[list[int]]:
        return self.input if isinstance(self.input[0], list) else [self.input]


def _vectors(body: EmbeddingRequest, model: EmbeddingModel, pooled: list[np.ndarray]) -> np.ndarray:
    """[inputs, dimensions]: truncated to `dimensions`, then unit length again if the model's vectors were
    (Matryoshka) or the request asks it."""
    vectors = np.stack(pooled)[:, :body.dimensions or model.dimensions]
    if body.normalize or (model.normalizes and body.dimensions is not None):
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors.astype("<f4")


@router.post("/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict:
    model = request.app.state.registry.embedder(body.model)
    if body.dimensions is not None and body.dimensions > model.dimensions:
        raise RequestError(f"`dimensions` is {body.dimensions}; this model's embeddings have {model.dimensions}",
                           "dimensions")
    ticket = model.admission.admit(model.max_num_seqs + request.app.state.config.max_waiting_requests)
    try:
        texts = body.texts
        if texts is not None and body.prompt_template is not None:
            texts = await asyncio.to_thread(render_prompts, body.prompt_template, texts, model.truncate)
        inputs = await model.tokenize(texts) if texts is not None else body.token_ids
        model.check(inputs)
        pooled = await model.engine.embed(inputs, TIER_PRIORITY.get(body.service_tier or "", 0))
    finally:
        ticket.release()
    vectors = _vectors(body, model, pooled)
    as_base64 = body.encoding_format == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.tobytes()).decode() if as_base64 else v.tolist()}
            for i, v in enumerate(vectors)]
    tokens = sum(len(ids) for ids in inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    record(request, 200, model=body.model, usage=usage, body=body)
    return {"object": "list", "data": data, "model": model.name, "usage": usage}
