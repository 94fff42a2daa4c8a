"""The FastAPI application: routes under /v1 and Fireworks' /inference/v1, behind the guard (host, key,
drain, body size) and, when asked, CORS; engines live with it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel

from ember.api import (
    batch_jobs,
    batches,
    chat,
    completions,
    datasets,
    deployments,
    embeddings,
    files,
    health,
    metrics,
    models,
    responses,
    usage,
)
from ember.api.batch.runner import JobRunner
from ember.api.config import ServerConfig
from ember.api.errors import install_error_handlers
from ember.api.guard import Guard, GuardConfig
from ember.serving.models import ModelRegistry, close_model
from ember.store import Store

API_PREFIXES = ("/v1", "/inference/v1")
# headers a browser script may read from an answer
EXPOSED_HEADERS = ["x-request-id", "fireworks-prompt-tokens", "fireworks-cached-prompt-tokens",
                   "fireworks-server-time-to-first-token", "fireworks-server-processing-time",
                   "fireworks-sampling-options", "retry-after"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


def _documented(description: str) -> dict:
    return {"model": ErrorEnvelope, "description": description}


# what the routes really answer besides 200, for the OpenAPI document (FastAPI would list only 422, which
# Ember never sends: validation failures are 400s naming the field)
ERROR_RESPONSES: dict[int | str, dict] = {
    400: _documented("invalid request: the message names the field"),
    401: _documented("missing or wrong API key"),
    404: _documented("unknown model or route"),
    405: _documented("method not allowed"),
    408: _documented("the body did not arrive in time"),
    413: _documented("body larger than --max-request-bytes"),
    429: _documented("the model's waiting queue is full; retry after `retry-after` seconds"),
    503: _documented("shutting down or loading; retry after `retry-after` seconds"),
}


def create_app(registry: ModelRegistry, config: ServerConfig | None = None, store: Store | None = None) -> FastAPI:
    """`store`: where usage records go and /v1/usage reads them (none: no records, /v1/usage is a 404)."""
    config = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for m in registry:
            m.engine.start()
        reaper = None
        if control is not None:
            await asyncio.to_thread(control.restore)  # the deployments of the last server come back
            reaper = asyncio.create_task(deployments.reap_idle(control))
        if runner is not None:
            runner.start()  # jobs left unfinished by the last server resume here
        try:
            yield
        finally:
            if runner is not None:
                await runner.close()
            if reaper is not None:
                reaper.cancel()
                control.replicas.close()
            for m in registry:
                close_model(m)
            if store is not None:
                store.close()  # what is buffered is written first

    app = FastAPI(title="Ember", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.config = config
    app.state.draining = False
    app.state.metrics = metrics.Metrics(registry) if config.metrics else None
    app.state.store = store
    app.state.signing_key = secrets.token_bytes(32)  # signs download URLs (ember.api.datasets); dies with the server
    control = deployments.install(app, registry, store)
    runner = JobRunner(app, store, registry, config.batch_concurrency, config.batch_max_lines) if store else None
    app.state.batch_runner = runner
    app.state.datasets_uploading = set()  # (account, dataset id) of the uploads under way: one per dataset at once
    app.state.job_create_lock = asyncio.Lock()  # batch job creation, from the id check to the row
    install_error_handlers(app)
    for prefix in API_PREFIXES:
        for router in (chat.router, completions.router, responses.router, embeddings.router, models.router,
                       health.stats_router, usage.router, files.router, batches.router, datasets.router,
                       batch_jobs.router, deployments.router):
            app.include_router(router, prefix=prefix, responses=ERROR_RESPONSES)
    app.include_router(health.health_router)
    app.include_router(datasets.downloads_router)
    if config.metrics:
        app.include_router(metrics.router)
    app.include_router(usage.page_router)
    app.openapi = lambda: _openapi_without_422(app)
    app.add_middleware(Guard, config=GuardConfig.build(config.host, config.allowed_hosts, config.api_key,
                                                       config.api_key_file, config.max_request_bytes,
                                                       config.body_timeout, config.max_upload_bytes),
                       state=app.state)
    if config.cors_allow_origins:  # outermost: preflights and refusals carry the CORS headers too
        origins = [o.strip() for o in config.cors_allow_origins.split(",") if o.strip()]
        # credentials (cookies) never: an API key travels in a header, and "*" with credentials is unsafe
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"], allow_headers=["*"],
                           expose_headers=EXPOSED_HEADERS)
    return app


def _openapi_without_422(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
