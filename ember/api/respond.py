"""What chat and text completions share: admission, preparation off the event loop, ids, perf
headers, the JSON answer or the SSE stream."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ember.api.protocol import GenerationRequest
from ember.api.records import record
from ember.api.sse import event_stream, stream_response
from ember.serving.generate import ChoiceEvent, Generation
from ember.serving.models import ServedModel

HOST = socket.gethostname()

# how often a non-streaming request checks whether its client is still there
_DISCONNECT_POLL_S = 0.2

# a choice's event -> its choice object in a response or in a chunk
ChunkChoice = Callable[[ChoiceEvent], dict]


@dataclass(frozen=True)
class Shape:
    """How one endpoint family spells its responses."""

    id_prefix: str  # "chatcmpl" -> ids like chatcmpl-<hex>
    object: str
    chunk_object: str
    choice: ChunkChoice  # a finished choice of a JSON answer
    delta: ChunkChoice  # the choice object of a streamed chunk
    opening: Callable[[int], dict] | None = None  # a first chunk per choice (chat announces the role)
    # return_token_ids: completions give each choice its prompt's ids; chat gives its one prompt's at the top
    prompt_ids_per_choice: bool = False
    # the whole JSON answer from the finished choices, where it is not a list of choices (the Responses API)
    answer: Callable[[Generation, list[ChoiceEvent]], dict] | None = None
    # the SSE frames of a stream, where they are not chat chunks (the Responses API's typed events)
    events: Callable[[Generation], AsyncIterator[str]] | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex


def perf_metrics(gen: Generation) -> dict[str, str]:
    """Fireworks' performance metrics, as header values without the `fireworks-` prefix (perf_metrics in a
    body uses these keys); the speculation ones once the engine counted drafts, summed over the choices
    (the prediction's length is one choice's)."""
    metrics = {"prompt-tokens": str(gen.prompt_tokens), "cached-prompt-tokens": str(gen.cached_tokens),
               **{k: f"{v:.4f}" for k, v in gen.phases().items()},
               "num-concurrent-requests": str(gen.model.admission.active), "deployment": gen.model.name,
               "backend-host": HOST}
    spec = gen.speculation()
    if spec is not None:
        metrics.update({"speculation-prompt-tokens": str(spec.prediction_tokens),
                        "speculation-prompt-matched-tokens": str(spec.prediction_accepted),
                        "speculation-generated-tokens": str(spec.proposed),
                        "speculation-acceptance": spec.acceptance()})
    return metrics


def _perf(gen: Generation) -> dict[str, str]:
    return {f"fireworks-{k}": v for k, v in perf_metrics(gen).items()}


def _headers(request: Request, gen: Generation, response_id: str) -> dict[str, str]:
    """The headers known before the first token: a streaming response can send only these."""
    return {"x-request-id": request.headers.get("x-request-id") or response_id,
            "fireworks-prompt-tokens": str(gen.prompt_tokens),
            "fireworks-sampling-options": json.dumps(gen.sampling_options)}


async def respond(request: Request, body: GenerationRequest, model: ServedModel,
                  plan: Callable[[], Generation], shape: Shape) -> Response:
    """Admits the request (a 429 past the model's running batch and waiting line), runs `plan`
    (templates, tokenization, grammars) in the model's worker threads, then answers: JSON once every
    choice finished, or an SSE stream. The request holds its place until its generation ends."""
    if body.prompt_cache_isolation_key is None:  # Fireworks also takes the namespace as a header
        body.prompt_cache_isolation_key = request.headers.get("x-prompt-cache-isolation-key")
    limit = model.max_num_seqs + request.app.state.config.max_waiting_requests
    ticket = model.admission.admit(limit)
    arrived = getattr(request.state, "started", time.perf_counter())
    marks: list[float] = []

    def timed_plan() -> Generation:
        marks.append(time.perf_counter())
        return plan()
    try:
        gen = await model.prepare(timed_plan)
        gen.mark_preparation(arrived, marks[0], time.perf_counter())
        if body.stream:  # the stream gives the place back when it ends, and records its usage
            recorded = False

            def end() -> None:
                nonlocal recorded
                ticket.release()
                if not recorded:
                    recorded = True
                    _record(request, body, gen, 200, streamed=True)
            return _answer_stream(request, body, gen, shape, end)
    except BaseException:
        ticket.release()
        raise
    try:
        response = await _answer(request, body, gen, shape)
    finally:
        ticket.release()
    _record(request, body, gen, response.status_code)
    return response


def _record(request: Request, body: GenerationRequest, gen: Generation, status: int, streamed: bool = False) -> None:
    record(request, status, model=body.model, request_id=gen.request_id, streamed=streamed, usage=gen.usage(),
           finish_reason=gen.finish_reason, ttft=gen.time_to_first_token() if gen.first_token_at else None,
           latency=gen.elapsed(), queue_time=gen.queue_time, body=body, gaps=gen.token_gaps)


def _envelope(body: GenerationRequest, gen: Generation, shape: Shape) -> dict:
    return {"id": f"{shape.id_prefix}-{gen.request_id}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": gen.model.fingerprint}


def _top(body: GenerationRequest, gen: Generation, shape: Shape) -> dict:
    """Top-level fields besides the envelope: chat's one prompt's token ids (return_token_ids)."""
    return {"prompt_token_ids": gen.prompts[0].token_ids} \
        if body.return_token_ids and not shape.prompt_ids_per_choice else {}


def _choice(gen: Generation, shape: Shape, make: ChunkChoice, ev: ChoiceEvent) -> dict:
    return {**make(ev), **gen.choice_fields(ev, shape.prompt_ids_per_choice)}


def _answer_stream(request: Request, body: GenerationRequest, gen: Generation, shape: Shape,
                   release: Callable[[], None]) -> Response:
    envelope = _envelope(body, gen, shape)
    if shape.events is not None:
        return event_stream(shape.events(gen), _headers(request, gen, envelope["id"]), release)
    opening = [shape.opening(i) for i in range(gen.num_choices)] if shape.opening else []
    perf = (lambda: perf_metrics(gen)) if body.perf_metrics_in_response else None
    return stream_response(gen, {**envelope, "object": shape.chunk_object},
                           lambda ev: _choice(gen, shape, shape.delta, ev), opening, _top(body, gen, shape),
                           body.include_usage_chunk, perf, _headers(request, gen, envelope["id"]), release)


async def _answer(request: Request, body: GenerationRequest, gen: Generation, shape: Shape) -> Response:
    envelope = _envelope(body, gen, shape)
    task = asyncio.create_task(gen.collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return Response(status_code=499)
    finally:
        if not task.done():  # a client gone, or this handler cancelled: the generation must not outlive it
            task.cancel()  # closes the engine streams: their sequences abort and free their KV blocks
            await asyncio.gather(task, return_exceptions=True)
    if shape.answer is not None:
        content = shape.answer(gen, task.result())
    else:
        choices = [_choice(gen, shape, shape.choice, ev) for ev in task.result()]
        content = {**envelope, "object": shape.object, **_top(body, gen, shape), "choices": choices,
                   "usage": gen.usage()}
    if body.perf_metrics_in_response:
        content["perf_metrics"] = perf_metrics(gen)
    return JSONResponse(content, headers={**_headers(request, gen, envelope["id"]), **_perf(gen)})
