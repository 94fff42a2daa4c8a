"""GET /health for readiness probes and GET /v1/engine/stats: the engine's counters (batching, KV
blocks in use, cache hits, preemptions) so tests and operators can see the scheduler at work."""

from __future__ import annotations

from fastapi import APIRouter, Request

health_router = APIRouter()
stats_router = APIRouter()


@health_router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@stats_router.get("/engine/stats")
async def engine_stats(request: Request) -> dict:
    """{served model name: engine.stats()}."""
    return {m.name: m.engine.stats() for m in request.app.state.registry.all()}
