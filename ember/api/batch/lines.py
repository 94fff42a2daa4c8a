"""A batch input file, checked whole before anything runs: JSON on every line, the line's own fields, a unique
`custom_id`, a known model and endpoint, and the body as the live endpoint validates it. The first problem
fails the job with the line named (both OpenAI and Fireworks fail a malformed file whole)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from ember.api.embeddings import EmbeddingRequest
from ember.api.errors import describe_validation
from ember.api.protocol import ChatCompletionRequest, CompletionRequest
from ember.api.responses_protocol import ResponsesRequest
from ember.serving.errors import RequestError

if TYPE_CHECKING:
    from ember.serving.models import ModelRegistry

# the endpoints a batch line may call, with the body each validates
ENDPOINTS: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                         "/v1/completions": CompletionRequest, "/v1/responses": ResponsesRequest,
                                         "/v1/embeddings": EmbeddingRequest}
MAX_CUSTOM_ID = 512  # characters
LINE_FIELDS = {"openai": {"custom_id", "method", "url", "body"}, "fireworks": {"custom_id", "body"}}


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line of the file: what errors name and results are keyed by
    custom_id: str
    body: dict[str, Any]  # the request as the endpoint takes it, model included


class InvalidFile(Exception):
    """Why a file cannot run: `line` (1-based) names where, `param` the field within it."""

    def __init__(self, message: str, line: int | None = None, param: str | None = None,
                 code: str = "invalid_line") -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line, self.param, self.code = line, param, code


def _body(record: dict, shape: str, number: int, endpoint: str, model: str | None,
          defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(record) - LINE_FIELDS[shape])
    if unknown:
        raise InvalidFile(f"unknown field `{unknown[0]}` (a line has {', '.join(sorted(LINE_FIELDS[shape]))})",
                          number, unknown[0], "unknown_field")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise InvalidFile(f"`custom_id` must be a string of 1 to {MAX_CUSTOM_ID} characters", number, "custom_id")
    if shape == "openai":
        if record.get("method") != "POST":
            raise InvalidFile("`method` must be \"POST\"", number, "method")
        if record.get("url") != endpoint:
            raise InvalidFile(f"`url` is {record.get('url')!r}; every line of this batch calls its endpoint "
                              f"{endpoint!r}", number, "url")
    body = record.get("body")
    if not isinstance(body, dict):
        raise InvalidFile("`body` must be a JSON object (the request)", number, "body")
    if model is not None:  # Fireworks: the job's model, for every line
        if body.get("model", model) != model:
            raise InvalidFile(f"`body.model` is {body['model']!r}; this job runs {model!r} for every line",
                              number, "body.model")
        body = {**body, "model": model}
    body = {**defaults, **body}
    if body.get("stream"):  # a line's answer is kept whole
        raise InvalidFile("a batch request is not streamed: leave out `stream`", number, "body.stream")
    return body


def parse_lines(data: bytes, shape: str, endpoint: str, model: str | None = None,
                defaults: dict[str, Any] | None = None, max_lines: int = 50_000) -> list[Line]:
    """Each line's own fields (JSON, the shape's fields, a unique `custom_id`, the url), not the bodies: what a
    client can check without the server. `model` and `defaults` as read_lines takes them."""
    lines: list[Line] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(lines) == max_lines:
            raise InvalidFile(f"the file has more than {max_lines} requests (the limit of one batch)",
                              number, code="too_many_requests")
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidFile(f"not valid JSON: {exc}", number, code="invalid_json") from exc
        if not isinstance(record, dict):
            raise InvalidFile("a line must be a JSON object", number, code="invalid_json")
        body = _body(record, shape, number, endpoint, model, defaults or {})
        custom_id = record["custom_id"]
        if custom_id in seen:
            raise InvalidFile(f"`custom_id` {custom_id!r} already appears on line {seen[custom_id]}", number,
                              "custom_id", "duplicate_custom_id")
        seen[custom_id] = number
        lines.append(Line(number, custom_id, body))
    if not lines:
        raise InvalidFile("the file has no requests", code="empty_file")
    return lines


def read_lines(data: bytes, shape: str, endpoint: str, registry: ModelRegistry, model: str | None = None,
               defaults: dict[str, Any] | None = None, max_lines: int = 50_000) -> list[Line]:
    """The file's requests, or InvalidFile for its first problem (the lines' own fields first, then the
    bodies). `model`: the model of every line (Fireworks; OpenAI's lines name theirs, one for the whole file);
    `defaults`: body fields a line may override."""
    if endpoint not in ENDPOINTS:
        raise InvalidFile(f"endpoint {endpoint!r} is not supported; one of {', '.join(ENDPOINTS)}",
                          param="endpoint", code="invalid_endpoint")
    schema = ENDPOINTS[endpoint]
    model_for = registry.embedder if schema is EmbeddingRequest else registry.get  # a 400 for the wrong kind
    lines = parse_lines(data, shape, endpoint, model, defaults, max_lines)
    for line in lines:
        try:
            schema.model_validate(line.body)
            model_for(line.body["model"])
        except ValidationError as exc:
            message, param, code = describe_validation(exc.errors())
            raise InvalidFile(message, line.number, f"body.{param}" if param else "body", code) from exc
        except RequestError as exc:
            raise InvalidFile(exc.message, line.number, f"body.{exc.param}" if exc.param else "body",
                              exc.code) from exc
        if line.body["model"] != lines[0].body["model"]:
            raise InvalidFile(f"`body.model` is {line.body['model']!r}; a batch runs one model, "
                              f"{lines[0].body['model']!r} on line {lines[0].number}", line.number, "body.model",
                              "mixed_models")
    return lines
