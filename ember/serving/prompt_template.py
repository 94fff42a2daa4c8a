"""Fireworks' embeddings `prompt_template`: each input (a string, seen as `{text}`, or an object, each field by its
name) fills a Jinja2 template, sandboxed as chat templates are, before it is embedded. `{field}` is the simple
substitution Fireworks documents; full Jinja2 (`{{ field }}`, `{% if %}`) works too, with `truncate_tokens(text,
n)` cutting text to its first n tokens of the model (default: what fits the model with its special tokens)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ember.serving.errors import RequestError

# `{name}` or `{obj.field}` that is not part of a Jinja2 `{{ ... }}` or `{% ... %}`
_SIMPLE = re.compile(r"(?<![{%])\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}(?![}%])")


def render_prompts(template: str, items: list[str | dict[str, Any]],
                   truncate_tokens: Callable[[str, int | None], str]) -> list[str]:
    """One string per input; a 400 naming `prompt_template` when it does not compile or render, or renders empty."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.globals["truncate_tokens"] = lambda text, n=None: truncate_tokens(str(text), n)
    try:
        compiled = env.from_string(_SIMPLE.sub(r"{{ \1 }}", template))
    except jinja2.TemplateError as exc:
        raise RequestError(f"prompt_template does not compile: {exc}", "prompt_template") from exc
    texts = []
    for i, item in enumerate(items):
        fields = item if isinstance(item, dict) else {"text": item}
        try:
            text = compiled.render(**fields)
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise RequestError(f"prompt_template cannot be filled from input {i}: {exc}", "prompt_template") from exc
        if not text:
            raise RequestError(f"prompt_template renders input {i} as an empty string", "prompt_template")
        texts.append(text)
    return texts
