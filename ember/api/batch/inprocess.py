"""A batch line goes through the app itself, as one more HTTP request would (the same validation, admission,
generation, usage record and metrics), without a socket. The scope carries the job's id, which no network
client can set: the guard lets such a request past the key and host checks (the job was authorised when it
was created), and its usage record names the job."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message

SCOPE_KEY = "ember.batch"  # the scope entry holding the job's id


def batch_job_of(scope: dict) -> str | None:
    return scope.get(SCOPE_KEY)


async def call(app: ASGIApp, path: str, body: dict[str, Any], job_id: str,
               disconnected: asyncio.Event) -> tuple[int, dict[str, Any], str]:
    """POST `body` to `path`: (status, the JSON answer, its x-request-id). Setting `disconnected` is the client
    going away: the request is aborted (its generation stops and frees its KV blocks) and answers 499."""
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "client": None,
             "server": None, "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(data)).encode())],
             SCOPE_KEY: job_id}
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    status, headers, chunks = 500, {}, []

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:  # a bug, answered 500 by the app's handler and raised again for the server to log
        status = 500
    raw = b"".join(chunks)
    try:
        answer = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        answer = {"error": {"message": raw.decode("utf-8", "replace")[:500], "type": "internal_server_error"}}
    return status, answer, headers.get("x-request-id", "")
