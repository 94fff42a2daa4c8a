"""Fireworks' batch inference jobs under `/v1/accounts/{account}/batchInferenceJobs`: create from a READY dataset
(`?batchInferenceJobId=`; the output dataset is the one named, or `<job>-output`), get, list and delete (which
cancels a running job: its output dataset keeps what was done)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from ember.api.batch.fireworks import check_id, dataset_id, job_object
from ember.api.batch.protocol import MAX_WINDOW_S, BatchJobCreate, InferenceParameters
from ember.api.batch.runner import keep_input
from ember.api.datasets import masked, next_token, not_found, page_params
from ember.api.errors import describe_validation
from ember.api.protocol import ChatCompletionRequest
from ember.api.state import store_of
from ember.serving.errors import FieldError, RequestError
from ember.store.batches import CANCELLABLE
from ember.store.files import dataset_folder

router = APIRouter()

PREFIX = "/accounts/{account}/batchInferenceJobs"


@router.post(PREFIX)
async def create_job(account: str, body: BatchJobCreate, request: Request,
                     batchInferenceJobId: str | None = None) -> dict:  # noqa: N803
    store, now = store_of(request), time.time()
    account = check_id(account, "account_id")
    job_id = check_id(batchInferenceJobId or f"bij-{uuid.uuid4().hex[:12]}", "batchInferenceJobId")
    name = f"accounts/{account}/batchInferenceJobs/{job_id}"
    request.app.state.registry.get(body.model)  # a 404 naming `model` for one this server does not serve
    params = body.inferenceParameters or InferenceParameters()
    try:
        defaults = params.defaults()
        # what every line gets, checked now as a request's fields (an unknown one in extraBody, say)
        ChatCompletionRequest.model_validate({**defaults, "model": body.model,
                                              "messages": [{"role": "user", "content": "."}]})
    except FieldError as exc:
        raise RequestError(str(exc), f"inferenceParameters.{exc.field}") from exc
    except ValidationError as exc:
        message, param, code = describe_validation(exc.errors())
        raise RequestError(f"inferenceParameters: {message}", "inferenceParameters", 400, code) from exc
    source_id = dataset_id(account, body.inputDatasetId, "inputDatasetId")
    source = await asyncio.to_thread(store.files.get_dataset, account, source_id)
    if source is None:
        raise not_found("dataset", f"accounts/{account}/datasets/{source_id}")
    if source["state"] != "READY" or not source["files"]:
        raise RequestError(f"dataset {source_id!r} has no uploaded data yet (upload its JSONL first)",
                           "inputDatasetId", 400, "FAILED_PRECONDITION")
    output_id = dataset_id(account, body.outputDatasetId, "outputDatasetId") if body.outputDatasetId \
        else f"{job_id[:56]}-output"
    exists = RequestError(f"batch inference job {name} already exists", "batchInferenceJobId", 409, "ALREADY_EXISTS")
    # one create at a time from the id check to the job's row: two requests for one id would otherwise both pass
    # the check, both make an output dataset and relink the job's input, and the later one's insert fail (a 500)
    async with request.app.state.job_create_lock:
        if await asyncio.to_thread(store.batches.get, name) is not None:
            raise exists
        output = {"account": account, "id": output_id, "created_at": now, "updated_at": now, "state": "UPLOADING",
                  "example_count": 0, "files": {}, "meta": {"sourceJobName": name,
                                                          "displayName": f"{body.displayName or job_id} output"}}
        if not await asyncio.to_thread(store.files.put_dataset, output):
            raise RequestError(f"dataset {output_id!r} already exists; name a new outputDatasetId",
                               "outputDatasetId", 409, "ALREADY_EXISTS")
        folder = dataset_folder(account, source_id)
        try:  # (a dataset of several files, shards, is read in the order of their names)
            input_path = await asyncio.to_thread(keep_input, store, [f"{folder}/{f}" for f in sorted(source["files"])],
                                                 name)
        except FileNotFoundError:  # the input dataset was deleted since it was looked up: as if it never was
            await asyncio.to_thread(store.files.delete_dataset, account, output_id)
            await asyncio.to_thread(store.blobs.remove_tree, f"batches/{name.replace('/', '_')}")
            raise not_found("dataset", f"accounts/{account}/datasets/{source_id}") from None
        spec = {"displayName": body.displayName or "", "inputDatasetId": f"accounts/{account}/datasets/{source_id}",
                "outputDatasetId": f"accounts/{account}/datasets/{output_id}",
                "inferenceParameters": params.model_dump(exclude_none=True), "defaults": defaults}
        row = {"id": name, "shape": "fireworks", "account": account, "created_at": now,
               "expires_at": now + MAX_WINDOW_S, "status": "validating", "model": body.model,
               "endpoint": "/v1/chat/completions", "input_path": input_path, "spec": spec,
               "times": {"validating": now}}
        if not await asyncio.to_thread(store.batches.create, row):  # another server on the same database won
            await asyncio.to_thread(store.files.delete_dataset, account, output_id)
            raise exists
    request.app.state.batch_runner.wake()
    return job_object(await asyncio.to_thread(store.batches.get, name))


async def _job(request: Request, account: str, job_id: str) -> dict:
    name = f"accounts/{check_id(account, 'account_id')}/batchInferenceJobs/{check_id(job_id, 'batch_inference_job_id')}"
    job = await asyncio.to_thread(store_of(request).batches.get, name)
    if job is None or job["deleted"]:
        raise not_found("batch inference job", name)
    return job


@router.get(PREFIX + "/{job_id}")
async def get_job(account: str, job_id: str, request: Request, readMask: str | None = None) -> dict:  # noqa: N803
    return masked(job_object(await _job(request, account, job_id)), readMask)


@router.get(PREFIX)
async def list_jobs(account: str, request: Request, pageSize: Annotated[int | None, Query(ge=0)] = None,  # noqa: N803
                    pageToken: str | None = None, filter: str | None = None,  # noqa: N803, A002
                    orderBy: str | None = None, readMask: str | None = None) -> dict:  # noqa: N803
    offset, limit, descending, _ = page_params(pageSize, pageToken, filter, orderBy, ("createTime",))
    rows, total = await asyncio.to_thread(store_of(request).batches.list_account, check_id(account, "account_id"),
                                          offset, limit, descending)
    return {"batchInferenceJobs": [masked(job_object(r), readMask) for r in rows],
            "nextPageToken": next_token(offset, limit, total), "totalSize": total}


@router.delete(PREFIX + "/{job_id}")
async def delete_job(account: str, job_id: str, request: Request) -> dict:
    """A job still running is cancelled (its output dataset gets what was done) and forgotten once it stops."""
    job = await _job(request, account, job_id)
    batches = store_of(request).batches
    if job["status"] in CANCELLABLE:
        request.app.state.batch_runner.stop_job(job["id"])
        await asyncio.to_thread(batches.update, job["id"], status="cancelling", at=time.time(), deleted=True,
                                only_from=CANCELLABLE)
    job = await asyncio.to_thread(batches.get, job["id"])
    if job is not None and job["status"] in ("finalizing", "cancelling"):
        await asyncio.to_thread(batches.update, job["id"], deleted=True)
    elif job is not None:
        await asyncio.to_thread(batches.delete, job["id"])
    return {}
