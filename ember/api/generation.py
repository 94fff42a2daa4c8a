"""The part chat and text completions share: run a Generation, answer as JSON or as an SSE stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ember.serving.generate import ChoiceEvent, Generation

# (generation, index, text, finish_reason) -> one choice object of a streamed chunk
ChunkChoice = Callable[[int, str, str | None], dict]


def _headers(gen: Generation, request_id: str, timing: bool) -> dict[str, str]:
    headers = {"x-request-id": request_id, "fireworks-sampling-options": json.dumps(gen.sampling_options)}
    if timing:
        headers.update(gen.timing_headers())
    return headers


async def _collect(gen: Generation) -> tuple[list[str], list[str | None]]:
    texts = [""] * gen.num_choices
    reasons: list[str | None] = [None] * gen.num_choices
    async for ev in gen.events():
        texts[ev.index] += ev.text
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    return texts, reasons


async def respond_json(request: Request, gen: Generation, build: Callable[[list[str], list], dict]) -> JSONResponse:
    """Generate everything; a client that hangs up meanwhile cancels the work (and frees its KV blocks)."""
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    task = asyncio.create_task(_collect(gen))
    while not task.done():
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return JSONResponse({}, status_code=499)
    texts, reasons = task.result()
    body = build(texts, reasons)
    body["usage"] = gen.usage()
    return JSONResponse(body, headers=_headers(gen, request_id, timing=True))


def respond_stream(request: Request, gen: Generation, envelope: dict, chunk_choice: ChunkChoice,
                   first_choices: list[dict] | None, include_usage: bool) -> StreamingResponse:
    """SSE: one id for the whole stream, usage on the chunk that finishes the last choice (Fireworks),
    and with stream_options.include_usage also a final `choices: []` chunk (OpenAI)."""
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex

    def frame(choices: list[dict], usage: dict | None = None) -> str:
        chunk = {**envelope, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def body() -> AsyncIterator[str]:
        if first_choices:
            yield frame(first_choices)
        finished = 0
        events = gen.events()
        try:
            async for ev in events:
                ev: ChoiceEvent
                finished += ev.finish_reason is not None
                last = finished == gen.num_choices
                yield frame([chunk_choice(ev.index, ev.text, ev.finish_reason)], gen.usage() if last else None)
        finally:
            await events.aclose()
        if include_usage:
            yield frame([], gen.usage())
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={**_headers(gen, request_id, timing=False), "cache-control": "no-cache"})


def envelope(prefix: str, obj: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model}
