"""The FastAPI application: routes under /v1 and Fireworks' /inference/v1, engines started with it."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from ember.api import chat, completions, models
from ember.api.errors import install_error_handlers
from ember.serving.models import ModelRegistry


def create_app(registry: ModelRegistry) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in registry:
            m.engine.start()
        yield
        for m in registry:
            m.engine.shutdown()

    app = FastAPI(title="Ember", lifespan=lifespan)
    app.state.registry = registry
    install_error_handlers(app)
    for prefix in ("/v1", "/inference/v1"):
        for module in (chat, completions, models):
            app.include_router(module.router, prefix=prefix)
    app.include_router(models.health_router)
    return app
