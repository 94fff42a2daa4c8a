"""The Responses API: `POST /v1/responses` runs as a chat completion (the same template, tools, grammars,
sampling and admission) and answers as a `Response`; stored responses are read, listed and deleted from
the store, and `previous_response_id` continues a stored conversation."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ember.api.chat import plan_chat
from ember.api.protocol import ChatCompletionRequest
from ember.api.respond import Shape, respond
from ember.api.responses_protocol import ResponsesRequest
from ember.serving.errors import RequestError
from ember.serving.generate import ChoiceEvent, Generation
from ember.serving.responses import chat_messages, input_items, new_id, output_items, response_object, usage
from ember.store import Store

router = APIRouter()

# chat fields a Responses request carries over as they are
_SAME = ("model", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "frequency_penalty",
         "presence_penalty", "seed", "parallel_tool_calls", "user", "prompt_cache_key", "prompt_cache_isolation_key",
         "perf_metrics_in_response", "metadata", "safety_identifier", "service_tier", "prompt_cache_retention")


def _store(request: Request) -> Store:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise RequestError("this server stores no responses (it was started with --no-usage-records)", None, 404,
                           "not_found")
    return store


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


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    if body.stream:
        raise RequestError("streaming Responses are not supported by this server yet", "stream",
                           code="unsupported_parameter")
    model = request.app.state.registry.get(body.model)
    history: list[dict] = []
    if body.previous_response_id is not None:
        found = await asyncio.to_thread(_store(request).conversation,
                                        _known_shape(body.previous_response_id, "previous_response_id"))
        if found is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = found
    items = input_items(body.input)
    chat = _chat_request(body, chat_messages(body.instructions, history + items), model.max_model_len)
    response_id = new_id("resp") if body.store else None
    created = time.time()

    def answer(gen: Generation, events: list[ChoiceEvent]) -> dict:
        (event,) = events
        u = gen.usage()
        return response_object(response_id, body, output_items(event), event.finish_reason,
                               usage(u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                                     u["completion_tokens"]), created)

    safe = request.app.state.config.safe_tokenization
    response = await respond(request, chat, model, lambda: plan_chat(model, chat, safe),
                             Shape("resp", "response", "", lambda ev: {}, lambda ev: {}, answer=answer))
    if body.store and response.status_code == 200:
        await asyncio.to_thread(_store(request).put_response, json.loads(response.body), items,
                                body.previous_response_id)
    return response


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict:
    found = await asyncio.to_thread(_store(request).get_response, _known_shape(response_id))
    if found is None:
        raise _not_found(response_id)
    return found


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict:
    if not await asyncio.to_thread(_store(request).delete_response, _known_shape(response_id)):
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
        items, has_more = await asyncio.to_thread(_store(request).list_responses, limit, after, before, order)
    except ValueError as exc:
        raise RequestError(str(exc), "after" if after else "before") from exc
    return _page(items, has_more)


@router.get("/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, limit: Limit = 20, after: str | None = None,
                           before: str | None = None,
                           order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc") -> JSONResponse:
    _cursors(after, before)
    try:
        found = await asyncio.to_thread(_store(request).list_input_items, _known_shape(response_id), limit, after,
                                        before, order)
    except ValueError as exc:
        raise RequestError(str(exc), "after" if after else "before") from exc
    if found is None:
        raise _not_found(response_id)
    return JSONResponse(_page(*found))
