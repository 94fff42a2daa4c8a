"""Fireworks' datasets under `/v1/accounts/{account}/datasets`: create, `:upload` (multipart `file`), get, list,
update, delete, `:getDownloadEndpoint`, and `:getUploadEndpoint` + `:validateUpload` (files PUT to signed URLs,
several per dataset). Ember serves the signed URLs itself, at `/downloads/<token>` and `/uploads/<token>`: a
token is signed with a key the server draws at start-up and lasts DOWNLOAD_TTL_S, so a URL works without the API
key, names one file (and for an upload its size), and dies with the server or the hour."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from ember.api.batch.fireworks import EXPECTED, check_id, dataset_object
from ember.api.batch.protocol import DatasetCreate, DatasetSpec, UploadEndpointRequest
from ember.api.files import multipart, save, upload_of
from ember.api.state import store_of
from ember.serving.errors import RequestError
from ember.store.blobs import TooLarge
from ember.store.files import dataset_folder

router = APIRouter()
downloads_router = APIRouter()

DOWNLOAD_TTL_S = 3600
MAX_PAGE, DEFAULT_PAGE = 200, 50
MAX_OFFSET = 2**31


def not_found(kind: str, name: str) -> RequestError:
    return RequestError(f"{kind} {name!r} not found", None, 404, "NOT_FOUND")


def page_params(page_size: int | None, page_token: str | None, filter_: str | None, order_by: str | None,
                fields: tuple[str, ...]) -> tuple[int, int, bool, str]:
    """(offset, limit, descending, field) of a Fireworks listing; its page tokens are opaque offsets."""
    if filter_:
        raise RequestError("`filter` is not supported by this server yet", "filter", code="unsupported_parameter")
    order = (order_by or fields[0]).strip()
    field, _, direction = order.partition(" ")
    if field not in fields or direction not in ("", "desc", "asc"):
        raise RequestError(f"orderBy must be one of {', '.join(fields)}, optionally followed by \" desc\"", "orderBy")
    offset = 0
    if page_token:
        try:
            offset = int(base64.urlsafe_b64decode(page_token.encode()).decode())
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise RequestError("pageToken is not one this server handed out", "pageToken") from exc
        if not 0 <= offset <= MAX_OFFSET:  # a forged token: SQL refuses a negative or 64-bit-overflowing OFFSET
            raise RequestError("pageToken is not one this server handed out", "pageToken")
    limit = DEFAULT_PAGE if not page_size else min(max(page_size, 1), MAX_PAGE)
    return offset, limit, direction == "desc", field


def next_token(offset: int, limit: int, total: int) -> str:
    return base64.urlsafe_b64encode(str(offset + limit).encode()).decode() if offset + limit < total else ""


def masked(obj: dict[str, Any], read_mask: str | None) -> dict[str, Any]:
    """Only the fields `readMask` names (and the name), as Fireworks' field masks select them."""
    if not read_mask or read_mask.strip() in ("*", "**"):
        return obj
    keep = {f.strip().split(".")[0] for f in read_mask.split(",")} | {"name"}
    return {k: v for k, v in obj.items() if k in keep}


def sign(key: bytes, payload: str, expires: int) -> str:
    """A URL-safe token carrying `payload` until `expires` (epoch seconds), unforgeable without the key."""
    data = base64.urlsafe_b64encode(f"{payload}|{expires}".encode()).decode().rstrip("=")
    mac = hmac.new(key, data.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{data}.{mac}"


def verified(key: bytes, token: str) -> str | None:
    """The payload a token carries, or None when it is forged, garbled or expired."""
    data, _, mac = token.partition(".")
    # bytes, not str: compare_digest raises on non-ASCII text, and a URL may carry any
    if not hmac.compare_digest(hmac.new(key, data.encode(), hashlib.sha256).hexdigest()[:32].encode(),
                               mac.encode()):
        return None
    payload, _, expires = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode().rpartition("|")
    return payload if expires.isdigit() and int(expires) > time.time() else None


async def _dataset(request: Request, account: str, dataset_id: str) -> dict[str, Any]:
    row = await asyncio.to_thread(store_of(request).files.get_dataset, account, dataset_id)
    if row is None:
        raise not_found("dataset", f"accounts/{account}/datasets/{dataset_id}")
    return row


PREFIX = "/accounts/{account}/datasets"


def _awaiting_data(row: dict[str, Any], dataset_id: str) -> None:
    if row["files"] or row["meta"].get("sourceJobName"):
        raise RequestError(f"dataset {dataset_id!r} already has its data (or is a job's output); create another",
                           "dataset_id", 400, "FAILED_PRECONDITION")


def _size(path: Path) -> int | None:
    """The file's bytes, or None when it is not there."""
    return path.stat().st_size if path.exists() else None


def _count_examples(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


@router.post(PREFIX + "/{dataset_id}:upload")
async def upload_dataset(account: str, dataset_id: str, request: Request) -> dict:
    store = store_of(request)
    key = (check_id(account, "account_id"), check_id(dataset_id, "dataset_id"))
    # one upload per dataset at a time, claimed before the row is read: two at once once both succeeded, leaving
    # a file the dataset does not list (or, under one name, one file written by both)
    uploading: set[tuple[str, str]] = request.app.state.datasets_uploading
    if key in uploading:
        raise RequestError(f"dataset {dataset_id!r} is being uploaded already", "dataset_id", 400,
                           "FAILED_PRECONDITION")
    uploading.add(key)
    try:
        _awaiting_data(await _dataset(request, account, dataset_id), dataset_id)
        upload = upload_of(await multipart(request))
        if upload.filename in (".", ".."):  # the name is a path in the data directory: these would leave the folder
            raise RequestError(f"the file name {upload.filename!r} is not allowed; name the file", "file")
        relative = f"{dataset_folder(account, dataset_id)}/{upload.filename}"
        size = await save(request, upload, relative)
        examples = await asyncio.to_thread(_count_examples, store.blobs.path(relative))
        await asyncio.to_thread(store.files.update_dataset, account, dataset_id, state="READY",
                                files={upload.filename: size}, example_count=examples)
    finally:
        uploading.discard(key)
    return {"id": dataset_id, "bytes": size, "created_at": int(time.time()), "filename": upload.filename,
            "object": "file", "purpose": "dataset"}


@router.post(PREFIX + "/{dataset_id}:getUploadEndpoint")
async def upload_endpoint(account: str, dataset_id: str, body: UploadEndpointRequest, request: Request) -> dict:
    """Signed PUT URLs for a dataset's files (Fireworks' way to upload several shards or large files); each call
    replaces the set of files expected. `:validateUpload` then makes the dataset READY."""
    row = await _dataset(request, check_id(account, "account_id"), check_id(dataset_id, "dataset_id"))
    _awaiting_data(row, dataset_id)
    limit = request.app.state.config.max_upload_bytes
    expected: dict[str, int] = {}
    for name, size in body.filenameToSize.items():
        if name != name.replace("\\", "/").rsplit("/", 1)[-1] or name in ("", ".", ".."):
            raise RequestError(f"file name {name!r} must be a plain file name", "filenameToSize")
        if not (size.isdigit() and 0 < int(size) <= limit):
            raise RequestError(f"size {size!r} of {name!r} must be 1 to {limit} bytes (--max-upload-bytes)",
                               "filenameToSize", 413 if size.isdigit() and int(size) > limit else 400)
        expected[name] = int(size)
    await asyncio.to_thread(store_of(request).files.update_dataset, account, dataset_id,
                            meta={**row["meta"], EXPECTED: expected})
    expires, base = int(time.time()) + DOWNLOAD_TTL_S, str(request.base_url).rstrip("/")
    key = request.app.state.signing_key
    return masked({"filenameToSignedUrls": {
        name: f"{base}/uploads/{sign(key, f'put:{size}:{account}/{dataset_id}/{name}', expires)}"
        for name, size in expected.items()}}, body.readMask)


@router.post(PREFIX + "/{dataset_id}:validateUpload")
async def validate_upload(account: str, dataset_id: str, request: Request) -> dict:
    """The files `:getUploadEndpoint` registered are all there, whole: the dataset becomes READY."""
    store = store_of(request)
    row = await _dataset(request, check_id(account, "account_id"), check_id(dataset_id, "dataset_id"))
    _awaiting_data(row, dataset_id)
    expected: dict[str, int] = row["meta"].get(EXPECTED) or {}
    folder = dataset_folder(account, dataset_id)
    missing = [n for n, size in expected.items() if _size(store.blobs.path(f"{folder}/{n}")) != size]
    if not expected or missing:
        raise RequestError(f"not uploaded yet: {', '.join(missing) or 'no files were registered'}", "dataset_id",
                           400, "FAILED_PRECONDITION")
    examples = sum([await asyncio.to_thread(_count_examples, store.blobs.path(f"{folder}/{n}")) for n in expected])
    meta = {k: v for k, v in row["meta"].items() if k != EXPECTED}
    await asyncio.to_thread(store.files.update_dataset, account, dataset_id, state="READY", files=expected,
                            example_count=examples, meta=meta)
    return {}


@router.get(PREFIX + "/{dataset_id}:getDownloadEndpoint")
async def download_endpoint(account: str, dataset_id: str, request: Request, readMask: str | None = None,  # noqa: N803
                            downloadLineage: bool = False) -> dict:  # noqa: N803
    if downloadLineage:
        raise RequestError("`downloadLineage` is not supported by this server yet", "downloadLineage",
                           code="unsupported_parameter")
    row = await _dataset(request, check_id(account, "account_id"), check_id(dataset_id, "dataset_id"))
    expires = int(time.time()) + DOWNLOAD_TTL_S
    base = str(request.base_url).rstrip("/")
    key = request.app.state.signing_key
    folder = dataset_folder(account, dataset_id)
    return masked({"filenameToSignedUrls": {name: f"{base}/downloads/{sign(key, f'get:{folder}/{name}', expires)}"
                                            for name in sorted(row["files"])}}, readMask)


@router.post(PREFIX)
async def create_dataset(account: str, body: DatasetCreate, request: Request) -> dict:
    store, now = store_of(request), time.time()
    row = {"account": check_id(account, "account_id"), "id": check_id(body.datasetId, "datasetId"),
           "created_at": now, "updated_at": now, "state": "UPLOADING", "example_count": 0, "files": {},
           "meta": body.dataset.meta()}
    if not await asyncio.to_thread(store.files.put_dataset, row):
        raise RequestError(f"dataset accounts/{account}/datasets/{body.datasetId} already exists", "datasetId", 409,
                           "ALREADY_EXISTS")
    return dataset_object(row)


@router.get(PREFIX)
async def list_datasets(account: str, request: Request, pageSize: Annotated[int | None, Query(ge=0)] = None,  # noqa: N803
                        pageToken: str | None = None, filter: str | None = None,  # noqa: N803, A002
                        orderBy: str | None = None, readMask: str | None = None) -> dict:  # noqa: N803
    offset, limit, descending, field = page_params(pageSize, pageToken, filter, orderBy, ("name", "createTime"))
    rows, total = await asyncio.to_thread(store_of(request).files.list_datasets, check_id(account, "account_id"),
                                          offset, limit, descending, field == "createTime")
    return {"datasets": [masked(dataset_object(r), readMask) for r in rows],
            "nextPageToken": next_token(offset, limit, total), "totalSize": total}


@router.get(PREFIX + "/{dataset_id}")
async def get_dataset(account: str, dataset_id: str, request: Request, readMask: str | None = None) -> dict:  # noqa: N803
    return masked(dataset_object(await _dataset(request, check_id(account, "account_id"),
                                                check_id(dataset_id, "dataset_id"))), readMask)


@router.patch(PREFIX + "/{dataset_id}")
async def update_dataset(account: str, dataset_id: str, body: DatasetSpec, request: Request) -> dict:
    row = await _dataset(request, check_id(account, "account_id"), check_id(dataset_id, "dataset_id"))
    meta = {**row["meta"], **body.meta()}
    await asyncio.to_thread(store_of(request).files.update_dataset, account, dataset_id, meta=meta)
    return dataset_object(await _dataset(request, account, dataset_id))


@router.delete(PREFIX + "/{dataset_id}")
async def delete_dataset(account: str, dataset_id: str, request: Request) -> dict:
    found = await asyncio.to_thread(store_of(request).files.delete_dataset, check_id(account, "account_id"),
                                    check_id(dataset_id, "dataset_id"))
    if not found:
        raise not_found("dataset", f"accounts/{account}/datasets/{dataset_id}")
    return {}


@downloads_router.get("/downloads/{token}", include_in_schema=False)
async def download(token: str, request: Request) -> FileResponse:
    payload = verified(request.app.state.signing_key, token) or ""
    if not payload.startswith("get:"):
        raise RequestError("this download link is invalid or has expired; ask for a new one", None, 403,
                           "PERMISSION_DENIED")
    full = store_of(request).blobs.path(payload.removeprefix("get:"))
    if not full.exists():
        raise RequestError("the file is gone", None, 404, "NOT_FOUND")
    return FileResponse(full, media_type="application/octet-stream", filename=full.name)


@downloads_router.put("/uploads/{token}", include_in_schema=False)
async def upload_shard(token: str, request: Request) -> dict:
    """One file of a dataset, PUT to the URL `:getUploadEndpoint` signed for it (its exact size)."""
    payload = verified(request.app.state.signing_key, token) or ""
    kind, _, rest = payload.partition(":")
    size, _, path = rest.partition(":")
    if kind != "put" or not size.isdigit():
        raise RequestError("this upload link is invalid or has expired; ask for a new one", None, 403,
                           "PERMISSION_DENIED")
    account, dataset_id, name = path.split("/", 2)
    row = await asyncio.to_thread(store_of(request).files.get_dataset, account, dataset_id)
    if row is None or row["meta"].get(EXPECTED, {}).get(name) != int(size):
        raise RequestError("the dataset no longer expects this file; ask for a new upload link", None, 404,
                           "NOT_FOUND")
    relative = f"{dataset_folder(account, dataset_id)}/{name}"
    try:
        written = await store_of(request).blobs.receive(relative, request.stream(), int(size))
    except TooLarge as exc:
        raise RequestError(f"the file has more than the {size} bytes registered for it", None, 400,
                           "INVALID_ARGUMENT") from exc
    if written != int(size):
        await asyncio.to_thread(store_of(request).blobs.remove, relative)
        raise RequestError(f"the file has {written} bytes; {size} were registered for it", None, 400,
                           "INVALID_ARGUMENT")
    return {}
