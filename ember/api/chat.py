"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ember.api.generation import envelope, respond_json, respond_stream
from ember.api.protocol import ChatCompletionRequest
from ember.serving.errors import RequestError
from ember.serving.generate import plan_generation

router = APIRouter()


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    model = request.app.state.registry.get(body.model)
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    try:
        text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # the template's own raise_exception, e.g. on an unsupported role order
        raise RequestError(f"the chat template rejected these messages: {exc}", "messages") from exc
    prompt = model.tokenizer.encode(text, add_special_tokens=False)
    gen = plan_generation(model, body, [prompt], "messages")
    head = envelope("chatcmpl", "chat.completion", body.model)
    if not body.stream:
        return await respond_json(request, gen, lambda texts, reasons: {**head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]})
    chunk = {**head, "object": "chat.completion.chunk"}
    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
             for i in range(gen.num_choices)]
    return respond_stream(request, gen, chunk, lambda i, text, reason: {
        "index": i, "delta": {"content": text} if text or not reason else {}, "finish_reason": reason,
        "logprobs": None}, first, bool(body.stream_options and body.stream_options.include_usage))
