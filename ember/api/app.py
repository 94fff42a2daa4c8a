"""The FastAPI application: routes under /v1 and Fireworks' /inference/v1; engines live with it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ember.api import chat, completions, health, models
from ember.api.config import ServerConfig
from ember.api.errors import install_error_handlers
from ember.serving.models import ModelRegistry

API_PREFIXES = ("/v1", "/inference/v1")


def create_app(registry: ModelRegistry, config: ServerConfig | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for m in registry:
            m.engine.start()
        try:
            yield
        finally:
            for m in registry:
                m.engine.shutdown()

    app = FastAPI(title="Ember", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.config = config or ServerConfig()
    install_error_handlers(app)
    for prefix in API_PREFIXES:
        for router in (chat.router, completions.router, models.router, health.stats_router):
            app.include_router(router, prefix=prefix)
    app.include_router(health.health_router)
    return app
