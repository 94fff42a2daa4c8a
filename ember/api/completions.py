"""POST /v1/completions: a string, strings, token ids or lists of token ids (one choice group each)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ember.api.protocol import CompletionRequest
from ember.api.respond import Shape, new_request_id, respond
from ember.serving.generate import ChoiceEvent, Generation, plan_generation
from ember.serving.models import ServedModel
from ember.serving.prompts import completion_prompts
from ember.serving.structured import response_format_grammar

router = APIRouter()


def _choice(ev: ChoiceEvent) -> dict:
    return {"index": ev.index, "text": ev.text, "finish_reason": ev.finish_reason}


SHAPE = Shape(id_prefix="cmpl", object="text_completion", chunk_object="text_completion",
              choice=_choice, delta=_choice, prompt_ids_per_choice=True)


def plan_completion(model: ServedModel, body: CompletionRequest) -> Generation:
    """The prompts, the grammar and the sampling plan: CPU work, run in the model's worker threads."""
    prompts = completion_prompts(model.tokenizer, body.prompt)
    grammar = response_format_grammar(model.structured, body.response_format)
    return plan_generation(model, body, prompts, "prompt", new_request_id(), grammar)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    model = request.app.state.registry.get(body.model)
    return await respond(request, body, model, lambda: plan_completion(model, body), SHAPE)
