"""Limits on the JSON a client sends, wherever it is read: the body, and JSON text inside it that is
parsed again (a schema given as a string, a replayed call's arguments). Deep nesting would exhaust
the stack of every recursive reader after it; a lone UTF-16 surrogate (`"\\ud800"`, legal JSON) is
not text, and no tokenizer or encoder accepts it."""

from __future__ import annotations

import json
import re
from typing import Any

from ember.serving.errors import FieldError

MAX_DEPTH = 100  # nested arrays and objects; llguidance's own JSON reader stops at 128
MAX_TEXT_CHARS = 8 << 20  # JSON text parsed again
_SURROGATE = re.compile("[\ud800-\udfff]")


def _where(path: tuple) -> str:
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


def check_json(value: Any) -> None:
    """Raises FieldError naming the first string (or key) with a lone surrogate, or the first value
    nested deeper than MAX_DEPTH. Iterative: the value may be nested deeper than Python's stack."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise FieldError(_where(path), "strings must be valid Unicode text: this one holds a lone "
                                               "UTF-16 surrogate")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= MAX_DEPTH:
            raise FieldError(_where(path), f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    raise FieldError(_where((*path, key)), "keys must be valid Unicode text: this one holds "
                                                           "a lone UTF-16 surrogate")
                stack.append((child, (*path, key), depth + 1))
        else:  # token ids and numbers need no look (a long prompt of ids stays cheap)
            stack.extend((child, (*path, i), depth + 1) for i, child in enumerate(item)
                         if isinstance(child, str | dict | list))


def loads(text: str, field: str) -> Any:
    """json.loads within the limits; FieldError(field, why) for text that is not JSON or exceeds them."""
    if len(text) > MAX_TEXT_CHARS:
        raise FieldError(field, f"JSON text longer than {MAX_TEXT_CHARS} characters")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FieldError(field, f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise FieldError(field, f"JSON nested deeper than {MAX_DEPTH} levels") from exc
    try:
        check_json(value)
    except FieldError as exc:
        raise FieldError(field, str(exc)) from exc
    return value
