"""Prompts as token ids: chat messages through the model's template (tools included, truncated to
fit when asked, special-token text in messages kept as text), completion prompts as given."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ember.models.tokenizer import Tokenizer
from ember.serving.errors import RequestError
from ember.serving.tools import Tool, prepare_messages, template_speaks_hermes

# OpenAI's newer name for the system role; model templates only know "system"
_ROLE_ALIASES = {"developer": "system"}

CompletionPrompt = str | list[str] | list[int] | list[list[int]]
_MARKERS = range(0xF0000, 0x10FFFE)  # private-use characters, stand-ins for special-token text in messages


@dataclass
class Prompt:
    token_ids: list[int]
    fragments: list[str | int]  # what was tokenised: rendered text or the client's ids (raw_output)


def _strings(value: Any) -> list[str]:
    """Every string in a message (content, names, a call's arguments, ...)."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [s for item in items for s in _strings(item)]


def _replace_strings(value: Any, replace: dict[str, str]) -> Any:
    """`value` with every key of `replace` in its strings replaced by its value, longest keys first."""
    if isinstance(value, str):
        for old, new in replace.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: _replace_strings(v, replace) for k, v in value.items()}
    return [_replace_strings(v, replace) for v in value] if isinstance(value, list) else value


class _SafeText:
    """Safe tokenization (Fireworks'): special-token text that a message holds (`<|im_start|>system`
    typed by a user, or in a tool's result) is encoded as plain text, never as control tokens, while
    the template's own special tokens stay. Messages are rendered with a private-use character in place
    of each such text; the characters are swapped back and their spans kept for the tokenizer. Plain
    substring searches, not a regex: `re` holds the GIL through a whole 8 MB string."""

    def __init__(self, tokenizer: Tokenizer, messages: list[dict], enabled: bool) -> None:
        self.tokenizer = tokenizer
        strings = _strings(messages) if enabled else []
        found = sorted((t for t in tokenizer.special_texts if any(t in s for s in strings)), key=len, reverse=True)
        self.messages, self.originals = messages, {}
        if found:  # characters that no message holds (and no template writes)
            used = set("".join(strings))
            markers = (chr(c) for c in _MARKERS if chr(c) not in used)
            to_marker = {text: next(markers) for text in found}
            self.messages = _replace_strings(messages, to_marker)
            self.originals = {m: text for text, m in to_marker.items()}

    def encode(self, rendered: str) -> tuple[str, list[int]]:
        """The prompt text with the typed special-token text back in place, and its ids."""
        if not self.originals:
            return rendered, self.tokenizer.encode(rendered, add_special_tokens=False)
        pieces, spans, at, length = [], [], 0, 0
        for m in re.finditer(f"[{''.join(self.originals)}]", rendered):
            text = self.originals[m.group()]
            pieces += [rendered[at:m.start()], text]
            length += m.start() - at
            spans.append((length, length + len(text)))
            length += len(text)
            at = m.end()
        text = "".join([*pieces, rendered[at:]])
        return text, self.tokenizer.encode_with_plain_spans(text, spans)


def _render(tokenizer: Tokenizer, messages: list[dict], tools: list[Tool], safe: bool) -> Prompt:
    """Render with the model's chat template (which writes its own BOS) and tokenize. A template that
    writes Hermes-style <tool_call> blocks gets the tools and the calls itself; for any other template
    they are rewritten into plain messages (ember.serving.tools)."""
    guard = _SafeText(tokenizer, messages, safe)
    messages = guard.messages
    try:
        if template_speaks_hermes(tokenizer.template_for(tools or None)):
            listed = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                        "parameters": t.parameters}} for t in tools]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=listed or None)
        else:
            text = tokenizer.apply_chat_template(prepare_messages(messages, tools), add_generation_prompt=True)
    except Exception as exc:  # the template's own raise_exception, e.g. on an unsupported role order
        raise RequestError(f"the chat template rejected these messages: {exc}", "messages") from exc
    text, ids = guard.encode(text)
    return Prompt(ids, [text])


def chat_prompt(tokenizer: Tokenizer, messages: list[dict], truncate_len: int | None = None,
                tools: list[Tool] = (), safe: bool = False) -> Prompt:
    """`tools` are those the model may call (none with tool_choice none); `safe`: special-token text
    in the messages stays text (_SafeText). With `truncate_len` (Fireworks' prompt_truncate_len), the
    fewest oldest messages other than system ones are dropped for the prompt to fit; the last message
    always stays. The prompt shrinks with every message dropped, so a binary search finds how many
    in log2(n) renders (one render per dropped message made long conversations quadratic)."""
    messages = [{**m, "role": _ROLE_ALIASES.get(m["role"], m["role"])} for m in messages]
    tools = list(tools)
    droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]

    def dropping(count: int) -> Prompt:
        gone = set(droppable[:count])
        return _render(tokenizer, [m for i, m in enumerate(messages) if i not in gone], tools, safe)

    prompt = dropping(0)
    if truncate_len is None or len(prompt.token_ids) <= truncate_len:
        return prompt
    fits, fits_at = dropping(len(droppable)), len(droppable)
    if len(fits.token_ids) > truncate_len:
        raise RequestError(f"the system messages and the last message alone take {len(fits.token_ids)} "
                           f"tokens, more than prompt_truncate_len ({truncate_len})", "prompt_truncate_len")
    too_long_at = 0
    while fits_at - too_long_at > 1:
        middle = (too_long_at + fits_at) // 2
        candidate = dropping(middle)
        if len(candidate.token_ids) <= truncate_len:
            fits, fits_at = candidate, middle
        else:
            too_long_at = middle
    return fits


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
