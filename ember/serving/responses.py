"""The Responses API over the chat machinery: its items become chat messages for the model's template,
and a finished choice becomes output items and a `Response` object, in the shapes the `openai` SDK parses.
Items are plain dicts as the API returns them (and as the store keeps them)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from ember.serving.generate import ChoiceEvent


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_items(request_input: str | list[Any]) -> list[dict]:
    """The request's input as stored items, each with an id (a string is one user message)."""
    if isinstance(request_input, str):
        return [{"type": "message", "id": new_id("msg"), "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": request_input}]}]
    items = []
    for item in request_input:
        data = item.model_dump(exclude_none=True)
        if isinstance(data.get("content"), str):
            kind = "output_text" if data["role"] == "assistant" else "input_text"
            data["content"] = [{"type": kind, "text": data["content"]}]
        items.append({"id": new_id("msg" if data["type"] == "message" else "fc"), **data})
    return items


def _text(content: str | list[dict]) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Chat-template messages for a conversation's items: instructions as the system message, consecutive
    function calls as one assistant message's tool_calls, their outputs as tool messages."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _text(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])})
    return messages


def output_items(event: ChoiceEvent) -> list[dict]:
    """A finished choice as output items: its text as one assistant message, each tool call as a function_call."""
    items = []
    if event.text or not event.tool_calls:
        items.append({"type": "message", "id": new_id("msg"), "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": event.text, "annotations": [], "logprobs": []}]})
    calls: dict[int, dict] = {}
    for delta in event.tool_calls:
        call = calls.setdefault(delta.index, {"type": "function_call", "id": new_id("fc"), "call_id": "",
                                              "name": "", "arguments": "", "status": "completed"})
        if delta.id is not None:
            call.update(call_id=delta.id, name=delta.name)
        call["arguments"] += delta.arguments
    return items + list(calls.values())


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage names, with Fireworks' chat names beside them."""
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens}


def response_object(response_id: str | None, request: Any, output: list[dict], finish_reason: str | None,
                    usage_: dict | None, created_at: float | None = None) -> dict:
    """The `Response` object: completed, or incomplete when max_output_tokens cut it short."""
    incomplete = finish_reason == "length"
    choice = request.tool_choice
    return {
        "id": response_id, "object": "response", "created_at": created_at or time.time(),
        "status": "incomplete" if incomplete else "completed", "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": request.instructions, "model": request.model, "output": output,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "tool_choice": choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto"),
        "tools": [t.model_dump(exclude_none=True) for t in request.function_tools],
        "temperature": request.temperature, "top_p": request.top_p,
        "max_output_tokens": request.max_output_tokens, "previous_response_id": request.previous_response_id,
        "metadata": request.metadata or {}, "store": request.store, "text": {"format": {"type": "text"}}
        if request.text is None or request.text.format is None else {"format": request.text.format.model_dump(
            by_alias=True, exclude_none=True)},
        "truncation": request.truncation or "disabled", "user": request.user, "usage": usage_,
    }
