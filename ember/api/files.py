"""OpenAI's files: `POST /v1/files` (multipart `file` and `purpose`, optional `expires_after`), list, retrieve,
content and delete. Contents live in the data directory, metadata in the store; an upload past
--max-upload-bytes is a 413 and leaves nothing behind."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from ember.api.state import store_of
from ember.serving.errors import RequestError
from ember.store.blobs import CHUNK, TooLarge

router = APIRouter()

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_FILENAME = 512


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": int(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": int(row["expires_at"]) if row["expires_at"] is not None else None, "status_details": None}


def not_found(kind: str, value: str, param: str | None = None) -> RequestError:
    return RequestError(f"No {kind} with id '{value}' found.", param, 404, "not_found")


async def multipart(request: Request) -> Any:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError("upload the file as multipart/form-data", None, 400, "invalid_body")
    try:
        return await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # starlette's parser: a malformed body
        raise RequestError(f"the multipart body cannot be read: {exc}", None, 400, "invalid_body") from exc


def upload_of(form: Any, field: str = "file") -> UploadFile:
    upload = form.get(field)
    if not isinstance(upload, UploadFile):
        raise RequestError(f"`{field}` is required: the file, as a multipart file part", field, 400, "missing_field")
    name = (upload.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1] or "upload"
    if len(name) > MAX_FILENAME:
        raise RequestError(f"the file name has more than {MAX_FILENAME} characters", field)
    upload.filename = name
    return upload


async def chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


async def save(request: Request, upload: UploadFile, relative: str) -> int:
    """The upload written under the data directory; its size (a 413 past --max-upload-bytes)."""
    limit = request.app.state.config.max_upload_bytes
    try:
        return await store_of(request).blobs.receive(relative, chunks(upload), limit)
    except TooLarge as exc:
        raise RequestError(f"the file exceeds {limit} bytes (--max-upload-bytes)", "file", 413,
                           "file_too_large") from exc


def _expiry(form: Any, now: float) -> float | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise RequestError("expires_after[anchor] must be \"created_at\"", "expires_after.anchor")
    if not (isinstance(seconds, str) and seconds.isdigit() and 3600 <= int(seconds) <= 30 * 86400):
        raise RequestError("expires_after[seconds] must be between 3600 and 2592000", "expires_after.seconds")
    return now + int(seconds)


@router.post("/files")
async def create_file(request: Request) -> dict:
    store = store_of(request)
    form = await multipart(request)
    purpose = form.get("purpose")
    if purpose not in PURPOSES:
        raise RequestError(f"`purpose` must be one of {', '.join(PURPOSES)}", "purpose",
                           code="missing_field" if purpose is None else "invalid_value")
    unknown = sorted(set(form) - {"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"})
    if unknown:
        raise RequestError(f"unknown field `{unknown[0]}`", unknown[0], code="unknown_field")
    now = time.time()
    expires_at = _expiry(form, now)
    upload = upload_of(form)
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    relative = f"files/{file_id}"
    size = await save(request, upload, relative)
    row = {"id": file_id, "created_at": now, "purpose": purpose, "filename": upload.filename, "bytes": size,
           "expires_at": expires_at, "path": relative}
    await asyncio.to_thread(store.files.put_file, row)
    return file_object(row)


async def _file(request: Request, file_id: str) -> dict[str, Any]:
    row = await asyncio.to_thread(store_of(request).files.get_file, file_id)
    if row is None:
        raise not_found("file", file_id)
    return row


@router.get("/files")
async def list_files(request: Request, limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     after: str | None = None, order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
                     purpose: str | None = None) -> dict:
    store = store_of(request)
    try:
        rows, has_more = await asyncio.to_thread(store.files.list_files, limit, after, order, purpose)
    except ValueError as exc:
        raise RequestError(str(exc), "after") from exc
    data = [file_object(r) for r in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.get("/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict:
    return file_object(await _file(request, file_id))


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> FileResponse:
    """A 404, not a 500, when the contents are gone: a DELETE between reading the row and sending the file."""
    row = await _file(request, file_id)
    path = store_of(request).blobs.path(row["path"])
    if not await asyncio.to_thread(path.is_file):
        raise not_found("file", file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=row["filename"])


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    if not await asyncio.to_thread(store_of(request).files.delete_file, file_id):
        raise not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}
