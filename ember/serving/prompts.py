"""Prompts as token ids: chat messages through the model's template (tools included, truncated to
fit when asked), completion prompts as given."""

from __future__ import annotations

from dataclasses import dataclass

from ember.models.tokenizer import Tokenizer
from ember.serving.errors import RequestError
from ember.serving.tools import Tool, prepare_messages, template_speaks_hermes

# OpenAI's newer name for the system role; model templates only know "system"
_ROLE_ALIASES = {"developer": "system"}

CompletionPrompt = str | list[str] | list[int] | list[list[int]]


@dataclass
class Prompt:
    token_ids: list[int]
    fragments: list[str | int]  # what was tokenised: rendered text or the client's ids (raw_output)


def _render(tokenizer: Tokenizer, messages: list[dict], tools: list[Tool]) -> Prompt:
    """Render with the model's chat template (which writes its own BOS) and tokenize. A template that
    writes Hermes-style <tool_call> blocks gets the tools and the calls itself; for any other template
    they are rewritten into plain messages (ember.serving.tools)."""
    try:
        if template_speaks_hermes(tokenizer.template_for(tools or None)):
            listed = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                        "parameters": t.parameters}} for t in tools]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=listed or None)
        else:
            text = tokenizer.apply_chat_template(prepare_messages(messages, tools), add_generation_prompt=True)
    except Exception as exc:  # the template's own raise_exception, e.g. on an unsupported role order
        raise RequestError(f"the chat template rejected these messages: {exc}", "messages") from exc
    return Prompt(tokenizer.encode(text, add_special_tokens=False), [text])


def chat_prompt(tokenizer: Tokenizer, messages: list[dict], truncate_len: int | None = None,
                tools: list[Tool] = ()) -> Prompt:
    """`tools` are those the model may call (none with tool_choice none). With `truncate_len`
    (Fireworks' prompt_truncate_len), the oldest messages other than system ones are dropped, one at
    a time, until the prompt fits; the last message always stays."""
    messages = [{**m, "role": _ROLE_ALIASES.get(m["role"], m["role"])} for m in messages]
    tools = list(tools)
    prompt = _render(tokenizer, messages, tools)
    if truncate_len is None:
        return prompt
    droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
    dropped = 0
    while len(prompt.token_ids) > truncate_len and dropped < len(droppable):
        dropped += 1
        gone = set(droppable[:dropped])
        prompt = _render(tokenizer, [m for i, m in enumerate(messages) if i not in gone], tools)
    if len(prompt.token_ids) > truncate_len:
        raise RequestError(f"the system messages and the last message alone take {len(prompt.token_ids)} "
                           f"tokens, more than prompt_truncate_len ({truncate_len})", "prompt_truncate_len")
    return prompt


def completion_prompts(tokenizer: Tokenizer, prompt: CompletionPrompt) -> list[Prompt]:
    """Each prompt of a string, strings, token ids or lists of token ids; each becomes a choice group."""
    if isinstance(prompt, str):
        return [Prompt(tokenizer.encode(prompt), [prompt])]
    if all(isinstance(x, int) for x in prompt):
        return [Prompt(list(prompt), list(prompt))]
    return [Prompt(tokenizer.encode(x), [x]) if isinstance(x, str) else Prompt(list(x), list(x)) for x in prompt]


def check_prompts(prompts: list[Prompt], vocab_size: int, max_model_len: int, param: str) -> None:
    """Reject here, as a 400 naming the field, what the engine would refuse."""
    for p in prompts:
        ids = p.token_ids
        if not ids:
            raise RequestError("the prompt is empty", param)
        if any(not 0 <= t < vocab_size for t in ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab_size})", param)
        if len(ids) >= max_model_len:
            raise RequestError(f"the prompt is {len(ids)} tokens long; this model's context window is "
                               f"{max_model_len} tokens and must leave room for at least one generated token",
                               param, code="context_length_exceeded")
