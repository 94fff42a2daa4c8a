"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ember.api.protocol import ChatCompletionRequest
from ember.api.respond import Shape, new_request_id, respond
from ember.serving.generate import plan_generation
from ember.serving.prompts import chat_prompt

router = APIRouter()

SHAPE = Shape(
    id_prefix="chatcmpl", object="chat.completion", chunk_object="chat.completion.chunk",
    choice=lambda i, text, reason: {"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": reason},
    delta=lambda i, text, reason: {"index": i, "delta": {"content": text} if text else {},
                                   "finish_reason": reason},
    opening=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                       "logprobs": None},
)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    model = request.app.state.registry.get(body.model)
    prompt = chat_prompt(model.tokenizer, [m.for_template() for m in body.messages], body.prompt_truncate_len)
    gen = plan_generation(model, body, [prompt], "messages", new_request_id())
    return await respond(request, body, gen, SHAPE)
