"""GET /v1/models, /health and the engine's counters."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ember.serving.models import FIREWORKS_PREFIX

router = APIRouter()
health_router = APIRouter()


@router.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "ember",
         "context_length": m.max_model_len, "aliases": [FIREWORKS_PREFIX + m.name]}
        for m in request.app.state.registry]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    m = request.app.state.registry.get(model_id)
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "ember",
            "context_length": m.max_model_len}


@router.get("/engine/stats")
async def engine_stats(request: Request) -> dict:
    """Counters per model: steps, batching, KV blocks in use, cache hits, preemptions."""
    return {m.name: m.engine.stats() for m in request.app.state.registry}


@health_router.get("/health")
async def health() -> dict:
    return {"status": "ok"}
