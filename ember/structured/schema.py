"""JSON schemas as clients send them, made ready for constrained decoding: objects closed where the
schema leaves them open by omission, and `$ref`s kept valid when a schema is nested in a larger one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# keywords whose values are schemas: a map of them, a list of them, or one (a list too for old `items`)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("additionalProperties", "items", "additionalItems", "not", "if", "then", "else", "contains",
               "propertyNames", "unevaluatedProperties", "unevaluatedItems")


# fn(subschema, the keyword it sits under, the schema holding that keyword): the new subschema
SchemaFn = Callable[[dict, str | None, dict | None], dict]


def map_schema(schema: Any, fn: SchemaFn, keyword: str | None = None, parent: dict | None = None) -> Any:
    """A copy of `schema` with `fn` applied to every subschema, innermost first. Values that are data
    (`const`, `enum`, `default`, ...) are never visited."""
    if not isinstance(schema, dict):
        return schema  # a boolean schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: map_schema(v, fn, key, schema) for k, v in value.items()}
        elif (key in _SCHEMA_LISTS or key in _SCHEMA_ONE) and isinstance(value, list):
            out[key] = [map_schema(v, fn, key, schema) for v in value]
        elif key in _SCHEMA_ONE:
            out[key] = map_schema(value, fn, key, schema)
    return fn(out, keyword, parent)


def _lists_keys(schema: dict) -> bool:
    return "properties" in schema or "patternProperties" in schema


def _close(schema: dict, keyword: str | None, parent: dict | None) -> dict:
    """Objects that list their keys admit no others unless they say so. Left alone: free-form objects
    (no keys listed: `{"type": "object"}` is any object) and objects combined with others, whose keys
    the other parts may add: `allOf` members, `anyOf`/`oneOf` members beside listed keys, and objects
    with a `$ref` or such members beside their own keys."""
    open_by_omission = "additionalProperties" not in schema and "unevaluatedProperties" not in schema
    combined = keyword == "allOf" or (keyword in ("anyOf", "oneOf") and parent is not None and _lists_keys(parent)) \
        or any(k in schema for k in ("allOf", "anyOf", "oneOf", "$ref"))
    if _lists_keys(schema) and open_by_omission and not combined:
        return {**schema, "additionalProperties": False}
    return schema


def close_objects(schema: Any) -> Any:
    """What xgrammar's strict mode and llama.cpp's converter do: without this a small model fills an
    open object with keys of its own until max_tokens, and the answer never parses."""
    return map_schema(schema, _close)


def rebase_refs(schema: Any, pointer: str) -> Any:
    """`schema` for use at `pointer` (a URI fragment like `#/properties/arguments`) of a larger
    schema: its local refs (`#/$defs/X`, `#`) are made to point into its new place."""
    def rebase(node: dict, *_: object) -> dict:
        ref = node.get("$ref")
        return {**node, "$ref": pointer + ref[1:]} if isinstance(ref, str) and ref.startswith("#") else node

    return map_schema(schema, rebase)
