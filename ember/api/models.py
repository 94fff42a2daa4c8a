"""GET /v1/models and /v1/models/{id} (also under Fireworks' `accounts/fireworks/models/` name)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ember.serving.embedder import EmbeddingModel
from ember.serving.models import FIREWORKS_PREFIX, ServedModel

router = APIRouter()


def _card(m: ServedModel | EmbeddingModel) -> dict:
    card = {"id": m.name, "object": "model", "created": m.created, "owned_by": "ember",
            "context_length": m.max_model_len, "aliases": [FIREWORKS_PREFIX + m.name],
            "capabilities": list(m.capabilities)}
    return {**card, "dimensions": m.dimensions} if isinstance(m, EmbeddingModel) else card


@router.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_card(m) for m in request.app.state.registry.all()]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    return _card(request.app.state.registry.find(model_id))
