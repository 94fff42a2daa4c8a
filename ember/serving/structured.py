"""What a request constrains its output to: `response_format` or its tools as a grammar spec, compiled
by the model's structured-output backend (once per distinct text: the backend caches)."""

from __future__ import annotations

import json
from typing import Any, Protocol

from ember.serving.client_json import loads
from ember.serving.errors import RequestError
from ember.serving.tools import Tool, tool_grammar
from ember.structured.backend import Backend, Grammar, GrammarError, GrammarSpec
from ember.structured.schema import close_objects

ANY_OBJECT = {"type": "object"}


class ResponseFormat(Protocol):
    type: str
    grammar: str | None
    json_schema: dict[str, Any] | str | None

    def schema_source(self) -> dict[str, Any] | str | None: ...


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    """The schema as JSON text, its objects closed (ember.structured.schema.close_objects)."""
    if isinstance(schema, str):
        schema = loads(schema, param)
    if not isinstance(schema, dict):
        raise RequestError("a JSON schema must be an object", param)
    return json.dumps(close_objects(schema))


def _param(fmt: ResponseFormat) -> str:
    """The field that holds what is compiled (a json_object may carry its schema in either field)."""
    if fmt.type == "grammar":
        return "response_format.grammar"
    return "response_format.json_schema" if fmt.type == "json_schema" or fmt.json_schema is not None \
        else "response_format.schema"


def response_format_grammar(backend: Backend, fmt: ResponseFormat | None) -> Grammar | None:
    """None for free text; json_object without a schema is any JSON object."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "grammar":
        spec = GrammarSpec("gbnf", fmt.grammar or "")
    else:
        schema = fmt.schema_source()
        spec = GrammarSpec("json_schema", _schema_text(ANY_OBJECT if schema is None else schema, _param(fmt)))
    return compile_grammar(backend, spec, _param(fmt))


def compile_grammar(backend: Backend, spec: GrammarSpec, param: str) -> Grammar:
    try:
        return backend.compile(spec)
    except GrammarError as exc:
        raise RequestError(f"cannot use this {spec.kind.replace('_', ' ')}: {exc}", param,
                           code="invalid_grammar") from exc


def tools_grammar(backend: Backend, tools: list[Tool], choice: str, parallel: bool,
                  function: str | None = None, max_calls: int | None = None) -> Grammar:
    """When the tools' grammar does not compile, each parameters schema alone finds the culprit."""
    try:
        return backend.compile(tool_grammar(tools, choice, parallel, function, max_calls))
    except GrammarError as exc:
        for i, tool in enumerate(tools):
            compile_grammar(backend, GrammarSpec("json_schema", json.dumps(tool.parameters)),
                            f"tools[{i}].function.parameters")
        raise RequestError(f"cannot use these tools: {exc}", "tools", code="invalid_grammar") from exc
