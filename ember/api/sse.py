"""Server-sent events: `data: {json}\\n\\n` frames ending in `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ember.api.errors import error_body
from ember.serving.generate import ChoiceEvent, Generation

log = logging.getLogger("ember.api")

DONE = "data: [DONE]\n\n"


def frame(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def event_stream(frames: AsyncIterator[str], headers: dict[str, str], on_end: Callable[[], None]) -> StreamingResponse:
    """SSE frames as they come (chat chunks, the Responses API's typed events): a failure mid-stream is
    reported in-band, as OpenAI's SDKs expect once the headers are gone; `on_end` (idempotent) runs when
    the frames end and again after the response, for a client that left before the body began."""
    async def body() -> AsyncIterator[str]:
        try:
            async for data in frames:
                yield data
        except Exception:
            log.exception("stream failed")
            yield frame(error_body("internal server error", code="internal_error", type_="internal_server_error"))
        finally:
            await frames.aclose()
            on_end()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"}, background=BackgroundTask(on_end))


def stream_response(gen: Generation, envelope: dict, chunk_choice: Callable[[ChoiceEvent], dict],
                    opening: list[dict], first_extra: dict, include_usage: bool,
                    perf_metrics: Callable[[], dict] | None, headers: dict[str, str],
                    on_end: Callable[[], None]) -> StreamingResponse:
    """One chunk per event; `first_extra` (top-level fields) rides on the first chunk. The chunk that
    finishes the last choice carries `usage` (Fireworks); with include_usage a final `choices: []`
    chunk repeats it (OpenAI). Starlette cancels this generator when the client disconnects; closing
    `gen.events()` then aborts the engine sequences at once. `on_end` runs once the events end, and
    (it must be idempotent) again after the response, for a client that left before the body began."""
    pending_extra = dict(first_extra)

    def chunk(choices: list[dict], **extra) -> str:
        data = {**envelope, **pending_extra, "choices": choices, **extra}
        pending_extra.clear()
        return frame(data)

    async def chunks() -> AsyncIterator[str]:
        for choice in opening:
            yield chunk([choice])
        finished = 0
        events = gen.events()
        try:
            async for ev in events:
                finished += ev.finish_reason is not None
                extra = {"usage": gen.usage()} if finished == gen.num_choices else {}
                if extra and perf_metrics:
                    extra["perf_metrics"] = perf_metrics()
                yield chunk([chunk_choice(ev)], **extra)
        finally:
            await events.aclose()
            on_end()
        if include_usage:
            yield chunk([], usage=gen.usage())
        yield DONE

    return event_stream(chunks(), headers, on_end)
