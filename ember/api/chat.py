"""POST /v1/chat/completions: messages through the chat template, tools through a grammar, calls
back as `tool_calls`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ember.api.protocol import ChatCompletionRequest
from ember.api.respond import Shape, new_request_id, respond
from ember.serving.generate import ChoiceEvent, Generation, plan_generation
from ember.serving.models import ServedModel
from ember.serving.prompts import chat_prompt
from ember.serving.structured import response_format_grammar, tools_grammar
from ember.serving.tools import Tool, ToolCallDelta

router = APIRouter()

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # a function without `parameters`


def tool_calls_json(deltas: list[ToolCallDelta], streamed: bool) -> list[dict]:
    """OpenAI's spelling: a call's first streamed delta has its id, type and name, later ones only
    argument fragments (and an index); a whole call has no index."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"index": d.index} if streamed else {})
        if d.id is not None:
            call.update(id=d.id, type="function", function={"name": d.name, "arguments": ""})
        call.setdefault("function", {"arguments": ""})["arguments"] += d.arguments
    return list(calls.values())


def _message(ev: ChoiceEvent) -> dict:
    calls = tool_calls_json(ev.tool_calls, streamed=False)
    message = {"role": "assistant", "content": ev.text if ev.text or not calls else None}
    return {**message, "tool_calls": calls} if calls else message


def _delta(ev: ChoiceEvent) -> dict:
    delta: dict = {"content": ev.text} if ev.text else {}
    if ev.tool_calls:
        delta["tool_calls"] = tool_calls_json(ev.tool_calls, streamed=True)
    return delta


SHAPE = Shape(
    id_prefix="chatcmpl", object="chat.completion", chunk_object="chat.completion.chunk",
    choice=lambda ev: {"index": ev.index, "message": _message(ev), "finish_reason": ev.finish_reason},
    delta=lambda ev: {"index": ev.index, "delta": _delta(ev), "finish_reason": ev.finish_reason},
    opening=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                       "logprobs": None},
)


def plan_chat(model: ServedModel, body: ChatCompletionRequest, safe_tokenization: bool,
              max_tool_calls: int | None = None) -> Generation:
    """The prompt, the grammar and the sampling plan: CPU work, run in the model's worker threads.
    `max_tool_calls` bounds parallel calls (the Responses API's field)."""
    mode = body.tool_mode
    tools = [Tool(f.name, f.parameters or NO_ARGUMENTS, f.description) for f in body.function_defs] \
        if mode != "none" else []
    prompt = chat_prompt(model.tokenizer, [m.for_template() for m in body.messages], body.prompt_truncate_len,
                         tools, safe_tokenization)
    if tools:
        grammar = tools_grammar(model.structured, tools, mode, body.parallel_tool_calls is not False,
                                body.forced_function, max_tool_calls)
    else:
        grammar = response_format_grammar(model.structured, body.response_format)
    return plan_generation(model, body, [prompt], "messages", new_request_id(), grammar, bool(tools))


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    model = request.app.state.registry.get(body.model)
    safe = request.app.state.config.safe_tokenization if body.safe_tokenization is None else body.safe_tokenization
    return await respond(request, body, model, lambda: plan_chat(model, body, safe), SHAPE)
