"""GET /v1/usage: the usage records aggregated over time (what the dashboard draws and an operator bills
from), and GET /dashboard: one page, with its chart library vendored in the package (no internet needed).
The page itself holds no data, so it is served without a key; its requests for data carry the key the
user types (kept in the browser's localStorage)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from ember.serving.errors import RequestError
from ember.store.usage import BUCKETS, GROUPS

router = APIRouter()
page_router = APIRouter()
STATIC = Path(__file__).parent / "static"
MAX_BUCKETS = 10_000  # rows one answer may hold


def _instant(value: str | None, field: str, default: float) -> float:
    """Seconds since the epoch, or an ISO 8601 time (UTC when it names no zone)."""
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RequestError(f"`{field}` must be seconds since the epoch or an ISO 8601 time", field) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@router.get("/usage")
async def usage(request: Request, start: str | None = None, end: str | None = None,
                bucket: str = Query("hour"), model: str | None = None, group_by: str | None = None) -> dict:
    store = request.app.state.store
    if store is None:
        raise RequestError("this server keeps no usage records (it was started without a store)", None, 404,
                           "not_found")
    if bucket not in BUCKETS:
        raise RequestError(f"`bucket` must be one of {', '.join(BUCKETS)}", "bucket")
    if group_by is not None and group_by not in GROUPS:
        raise RequestError(f"`group_by` must be one of {', '.join(GROUPS)}", "group_by")
    until = _instant(end, "end", time.time())
    since = _instant(start, "start", until - 86400)
    if since >= until:
        raise RequestError("`start` must come before `end`", "start")
    if (until - since) / BUCKETS[bucket] > MAX_BUCKETS:
        raise RequestError(f"that range holds more than {MAX_BUCKETS} {bucket}s: choose a wider bucket", "bucket")
    data = store.usage_summary(since, until, bucket, model, group_by)
    return {"object": "list", "start": since, "end": until, "bucket": bucket, "group_by": group_by, "data": data}


@page_router.get("/dashboard", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse((STATIC / "dashboard.html").read_text())


@page_router.get("/dashboard/vendor/{name}", include_in_schema=False)
async def vendored(name: str) -> FileResponse:
    path = STATIC / "vendor" / name
    if name not in {"uPlot.iife.min.js", "uPlot.min.css"}:
        raise RequestError("not found", None, 404, "not_found")
    return FileResponse(path, headers={"cache-control": "max-age=86400"})
