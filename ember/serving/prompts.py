"""Prompts as token ids: chat messages through the model's template, completion prompts as given."""

from __future__ import annotations

from ember.models.tokenizer import Tokenizer
from ember.serving.errors import RequestError

# OpenAI's newer name for the system role; model templates only know "system"
_ROLE_ALIASES = {"developer": "system"}

CompletionPrompt = str | list[str] | list[int] | list[list[int]]


def chat_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Render with the model's chat template (which writes its own BOS) and tokenize."""
    messages = [{**m, "role": _ROLE_ALIASES.get(m["role"], m["role"])} for m in messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # the template's own raise_exception, e.g. on an unsupported role order
        raise RequestError(f"the chat template rejected these messages: {exc}", "messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompts(tokenizer: Tokenizer, prompt: CompletionPrompt) -> list[list[int]]:
    """Each prompt of a string, strings, token ids or lists of token ids; each becomes a choice group."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompt]


def check_prompts(prompts: list[list[int]], vocab_size: int, max_model_len: int, param: str) -> None:
    """Reject here, as a 400 naming the field, what the engine would refuse."""
    for p in prompts:
        if not p:
            raise RequestError("the prompt is empty", param)
        if any(not 0 <= t < vocab_size for t in p):
            raise RequestError(f"prompt token ids must lie in [0, {vocab_size})", param)
        if len(p) >= max_model_len:
            raise RequestError(f"the prompt is {len(p)} tokens long; this model's context window is "
                               f"{max_model_len} tokens and must leave room for at least one generated token",
                               param, code="context_length_exceeded")
