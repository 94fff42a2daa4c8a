"""What a batch line's answer means, for the server's job runner and for `ember batch` alike: run it again
later, or keep it as the line's result (in OpenAI's output format), with the tokens it counts for."""

from __future__ import annotations

from typing import Any

RETRY_STATUSES = frozenset({408, 429, 503})  # the server was busy or going away: the line runs again later
RETRY_PAUSE_S = 0.5


def usage_of(answer: dict[str, Any]) -> dict[str, int]:
    """A line's tokens from its answer's usage (chat and completions' names, or the Responses API's)."""
    u = answer.get("usage") or {}
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    return {"input_tokens": u.get("prompt_tokens", u.get("input_tokens", 0)),
            "output_tokens": u.get("completion_tokens", u.get("output_tokens", 0)),
            "cached_tokens": details.get("cached_tokens", 0)}


def output_line(line_id: str, custom_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's batch output line; `result` is {"status_code", "request_id", "body"}."""
    return {"id": line_id, "custom_id": custom_id, "response": result, "error": None}
