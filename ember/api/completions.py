"""POST /v1/completions: a string, strings, token ids or lists of token ids."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ember.api.generation import envelope, respond_json, respond_stream
from ember.api.protocol import CompletionRequest
from ember.serving.errors import RequestError
from ember.serving.generate import plan_generation

router = APIRouter()


def _prompts(body: CompletionRequest, tokenizer) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [tokenizer.encode(p)]
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    model = request.app.state.registry.get(body.model)
    prompts = _prompts(body, model.tokenizer)
    if any(not p for p in prompts):
        raise RequestError("the prompt is empty after tokenization", "prompt")
    gen = plan_generation(model, body, prompts, "prompt")
    head = envelope("cmpl", "text_completion", body.model)
    if not body.stream:
        return await respond_json(request, gen, lambda texts, reasons: {**head, "choices": [
            {"index": i, "text": t, "finish_reason": r, "logprobs": None}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]})
    return respond_stream(request, gen, head, lambda i, text, reason: {
        "index": i, "text": text, "finish_reason": reason, "logprobs": None}, None,
        bool(body.stream_options and body.stream_options.include_usage))
