"""OpenAI's batches: `POST /v1/batches` from an uploaded `batch` file, retrieve, cancel and list. The job runs
in the server's job runner (ember.api.batch.runner); its output and error files are files like any other."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from ember.api.batch.lines import ENDPOINTS
from ember.api.batch.openai import batch_object
from ember.api.batch.protocol import BatchCreate, window_seconds
from ember.api.batch.runner import keep_input
from ember.api.files import not_found
from ember.api.state import store_of
from ember.serving.errors import RequestError
from ember.store.batches import CANCELLABLE

router = APIRouter()

LATER_ENDPOINTS = ("/v1/moderations",)  # OpenAI's, not served by Ember yet


@router.post("/batches")
async def create_batch(body: BatchCreate, request: Request) -> dict:
    store = store_of(request)
    if body.endpoint in LATER_ENDPOINTS:
        raise RequestError(f"endpoint {body.endpoint!r} is not supported by this server yet", "endpoint",
                           code="unsupported_parameter")
    if body.endpoint not in ENDPOINTS:
        raise RequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}", "endpoint")
    source = await asyncio.to_thread(store.files.get_file, body.input_file_id)
    if source is None:
        raise not_found("file", body.input_file_id, "input_file_id")
    if source["purpose"] != "batch":
        raise RequestError(f"file {body.input_file_id!r} has purpose {source['purpose']!r}; a batch reads a file "
                           "uploaded with purpose \"batch\"", "input_file_id")
    hexid = uuid.uuid4().hex
    job_id, now = f"batch_{hexid}", time.time()
    try:
        input_path = await asyncio.to_thread(keep_input, store, [source["path"]], job_id)
    except FileNotFoundError:  # the file was deleted since it was looked up: as if it had never been
        await asyncio.to_thread(store.blobs.remove_tree, f"batches/{job_id}")
        raise not_found("file", body.input_file_id, "input_file_id") from None
    spec = {"input_file_id": body.input_file_id, "completion_window": body.completion_window,
            "metadata": body.metadata, "pending_output_file_id": f"file-{hexid[:12]}out{hexid[12:24]}",
            "pending_error_file_id": f"file-{hexid[:12]}err{hexid[12:24]}",
            "output_expires_after": body.output_expires_after.seconds if body.output_expires_after else None}
    expires_at = now + window_seconds(body.completion_window)
    row = {"id": job_id, "shape": "openai", "created_at": now, "expires_at": expires_at, "status": "validating",
           "model": "", "endpoint": body.endpoint, "input_path": input_path, "spec": spec, "times": {"validating": now}}
    await asyncio.to_thread(store.batches.create, row)
    request.app.state.batch_runner.wake()
    return batch_object(await asyncio.to_thread(store.batches.get, job_id))


async def _batch(request: Request, batch_id: str) -> dict:
    job = await asyncio.to_thread(store_of(request).batches.get, batch_id)
    if job is None or job["shape"] != "openai":
        raise not_found("batch", batch_id)
    return job


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> dict:
    return batch_object(await _batch(request, batch_id))


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict:
    """Stops new work at once; the job becomes `cancelled` once its lines in flight have stopped, its output
    holding what was done. Cancelling an ended batch changes nothing (OpenAI answers it as it stands)."""
    job = await _batch(request, batch_id)
    if job["status"] in CANCELLABLE:
        request.app.state.batch_runner.stop_job(batch_id)
        job = await asyncio.to_thread(store_of(request).batches.update, batch_id, status="cancelling",
                                      at=time.time(), only_from=CANCELLABLE) or job
    return batch_object(job)


@router.get("/batches")
async def list_batches(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None) -> dict:
    try:
        rows, has_more = await asyncio.to_thread(store_of(request).batches.list_openai, limit, after)
    except ValueError as exc:
        raise RequestError(str(exc), "after") from exc
    data = [batch_object(r) for r in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
