"""The Responses API: `POST /v1/responses` runs as a chat completion (the same template, tools, grammars,
sampling and admission) and answers as a `Response`; stored responses are read, listed and deleted from
the store, and `previous_response_id` continues a stored conversation."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ember.api.chat import plan_chat
from ember.api.protocol import ChatCompletionRequest
from ember.api.respond import Shape, respond
from ember.api.responses_protocol import ResponsesRequest
from ember.api.state import store_of
from ember.serving.errors import RequestError
from ember.serving.generate import ChoiceEvent, Generation
from ember.serving.responses import chat_messages, input_items, new_id, output_items, response_object, usage

router = APIRouter()

# chat fields a Responses request carries over as they are
_SAME = ("model", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "frequency_penalty",
         "presence_penalty", "seed", "parallel_tool_calls", "user", "prompt_cache_key", "prompt_cache_isolation_key",
         "perf_metrics_in_response", "metadata", "safety_identifier", "service_tier", "prompt_cache_retention",
         "ignore_eos")


def _not_found(response_id: str, param: str | None = None) -> RequestError:
    return RequestError(f"No response found with id '{response_id}'.", param, 404, "not_found")


_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # the ids Ember hands out (resp_, msg_, fc_) and nothing a database chokes on


def _known_shape(response_id: str, param: str | None = None) -> str:
    """An id that could be stored, else the 404 an unknown one gets (before it reaches the database)."""
    if not _ID.fullmatch(response_id):
        raise _not_found(response_id, param)
    return response_id


def _cursors(after: str | None, before: str | None) -> None:
    for name, value in (("after", after), ("before", before)):
        if value is not None and not _ID.fullmatch(value):
            raise RequestError(f"no item with id {value!r} to list from", name)


def _chat_request(body: ResponsesRequest, messages: list[dict], max_model_len: int) -> ChatCompletionRequest:
    """The chat completion a Responses request amounts to (validated as one: the same limits apply)."""
    chat: dict[str, Any] = {k: getattr(body, k) for k in _SAME if getattr(body, k) is not None}
    chat["messages"] = messages
    chat["stream"] = body.stream
    if body.max_output_tokens is not None:
        chat["max_tokens"] = body.max_output_tokens
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in body.function_tools]
    choice = body.tool_choice
    if choice is not None:
        chat["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                       "function": {"name": choice.name}}
    form = body.text.format if body.text is not None else None
    if form is not None and form.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif form is not None and form.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": form.name or "schema", "schema": form.schema_, **({"strict": form.strict} if form.strict else {})}}
    if body.truncation == "auto":  # drop the oldest turns until the prompt leaves room for the answer
        chat["prompt_truncate_len"] = max(1, max_model_len - (body.max_output_tokens or max_model_len // 4))
    else:
        chat["context_length_exceeded_behavior"] = "error"
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RequestError(f"{error['msg']} (in the conversation as chat messages)", "input") from exc


class _EventWriter:
    """The typed SSE events of a streamed response, numbered in order."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(gen: Generation, skeleton: dict, finish: Callable[[Generation, list[ChoiceEvent]], dict],
                  store: Callable[[dict], Awaitable[None]]) -> AsyncIterator[str]:
    """response.created and .in_progress; per output item .output_item.added, its text or arguments as
    deltas, then .done events; response.completed (or .incomplete) with the whole response and usage,
    which is also what is stored. Items are laid out as the unstreamed answer lays them out: the text
    message first, then the function calls."""
    event = _EventWriter()
    yield event("response.created", response=skeleton)
    yield event("response.in_progress", response=skeleton)
    message: dict | None = None
    calls: dict[int, dict] = {}
    merged = ChoiceEvent(0, "")
    events = gen.events()
    try:
        async for ev in events:
            merged.text += ev.text
            merged.tool_calls += ev.tool_calls
            merged.finish_reason = ev.finish_reason or merged.finish_reason
            if ev.text:
                if message is None:
                    message = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                               "content": []}
                    yield event("response.output_item.added", output_index=0, item=message)
                    yield event("response.content_part.added", item_id=message["id"], output_index=0,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                yield event("response.output_text.delta", item_id=message["id"], output_index=0, content_index=0,
                            delta=ev.text, logprobs=[])
            for delta in ev.tool_calls:
                call = calls.get(delta.index)
                if call is None:
                    call = calls[delta.index] = {"type": "function_call", "id": new_id("fc"), "call_id": delta.id,
                                                 "name": delta.name, "arguments": "", "status": "in_progress"}
                    yield event("response.output_item.added", output_index=len(calls) - (message is None), item=call)
                call["arguments"] += delta.arguments
                if delta.arguments:
                    yield event("response.function_call_arguments.delta", item_id=call["id"],
                                output_index=len(calls) - (message is None), delta=delta.arguments)
    finally:
        await events.aclose()
    final = finish(gen, [merged])
    for index, item in enumerate(final["output"]):  # the finished items, with the ids the stream used
        if item["type"] == "message":
            item["id"] = message["id"] if message is not None else item["id"]
            if message is None:
                yield event("response.output_item.added", output_index=index, item={**item, "content": []})
            part = item["content"][0]
            yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=part["text"], logprobs=[])
            yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part)
        else:
            streamed = next(c for c in calls.values() if c["call_id"] == item["call_id"])
            item["id"] = streamed["id"]
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    await store(final)
    yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    model = request.app.state.registry.get(body.model)
    history: list[dict] = []
    if body.previous_response_id is not None:
        found = await asyncio.to_thread(store_of(request).conversation,
                                        _known_shape(body.previous_response_id, "previous_response_id"))
        if found is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = found
    items = input_items(body.input)
    chat = _chat_request(body, chat_messages(body.instructions, history + items), model.max_model_len)
    storing = body.store and getattr(request.app.state, "store", None) is not None  # no store: nothing kept
    response_id = new_id("resp") if storing else None
    created = time.time()

    def answer(gen: Generation, events: list[ChoiceEvent]) -> dict:
        (event,) = events
        u = gen.usage()
        return response_object(response_id, body, output_items(event), event.finish_reason,
                               usage(u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                                     u["completion_tokens"]), created)

    async def store(final: dict) -> None:
        if storing:
            await asyncio.to_thread(store_of(request).put_response, final, items, body.previous_response_id)

    skeleton = {**response_object(response_id, body, [], None, None, created), "status": "in_progress"}
    safe = request.app.state.config.safe_tokenization
    shape = Shape("resp", "response", "", lambda ev: {}, lambda ev: {}, answer=answer,
                  events=lambda gen: _stream(gen, skeleton, answer, store))
    response = await respond(request, chat, model, lambda: plan_chat(model, chat, safe, body.max_tool_calls), shape)
    if not body.stream and response.status_code == 200:
        await store(json.loads(response.body))
    return response


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict:
    found = await asyncio.to_thread(store_of(request).get_response, _known_shape(response_id))
    if found is None:
        raise _not_found(response_id)
    return found


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict:
    if not await asyncio.to_thread(store_of(request).delete_response, _known_shape(response_id)):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


Limit = Annotated[int, Query(ge=1, le=100)]


@router.get("/responses")
async def list_responses(request: Request, limit: Limit = 20, after: str | None = None, before: str | None = None,
                         order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc") -> dict:
    _cursors(after, before)
    try:
        items, has_more = await asyncio.to_thread(store_of(request).list_responses, limit, after, before, order)
    except ValueError as exc:
        raise RequestError(str(exc), "after" if after else "before") from exc
    return _page(items, has_more)


@router.get("/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, limit: Limit = 20, after: str | None = None,
                           before: str | None = None,
                           order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc") -> JSONResponse:
    _cursors(after, before)
    try:
        found = await asyncio.to_thread(store_of(request).list_input_items, _known_shape(response_id), limit, after,
                                        before, order)
    except ValueError as exc:
        raise RequestError(str(exc), "after" if after else "before") from exc
    if found is None:
        raise _not_found(response_id)
    return JSONResponse(_page(*found))
