"""Schema rewriting before compilation (ember.structured.schema): which objects are closed, which are
left open, and refs that follow a schema nested in a larger one. The API tests show the effect on
answers; these pin the rules."""

from __future__ import annotations

import pytest

from ember.structured.schema import close_objects, rebase_refs

CLOSED = {"additionalProperties": False}
OBJ = {"type": "object", "properties": {"a": {"type": "string"}}}
PATTERN = {"type": "object", "patternProperties": {"^x": {}}}


@pytest.mark.parametrize("schema,expected", [
    (OBJ, {**OBJ, **CLOSED}),
    (PATTERN, {**PATTERN, **CLOSED}),
    ({"properties": {"a": OBJ}}, {"properties": {"a": {**OBJ, **CLOSED}}, **CLOSED}),  # nested, no `type`
    ({"type": "array", "items": OBJ}, {"type": "array", "items": {**OBJ, **CLOSED}}),
    ({"$defs": {"X": OBJ}, "$ref": "#/$defs/X"}, {"$defs": {"X": {**OBJ, **CLOSED}}, "$ref": "#/$defs/X"}),
    ({"anyOf": [OBJ, {"type": "null"}]}, {"anyOf": [{**OBJ, **CLOSED}, {"type": "null"}]}),
], ids=["object", "pattern-properties", "nested", "array-items", "defs", "any-of"])
def test_objects_that_list_keys_are_closed(schema, expected):
    assert close_objects(schema) == expected


@pytest.mark.parametrize("schema", [
    {"type": "object"},  # any object (json_object mode)
    {**OBJ, "additionalProperties": True},
    {**OBJ, "additionalProperties": {"type": "integer"}},
    {**OBJ, "unevaluatedProperties": False},
    {"allOf": [OBJ, {"properties": {"b": {}}}]},  # each member adds keys the other must allow
    {**OBJ, "oneOf": [{"properties": {"b": {}}}, {"properties": {"c": {}}}]},
    {**OBJ, "$ref": "#/$defs/More", "$defs": {"More": {"type": "object"}}},
    {"const": {"properties": {"a": 1}}, "enum": [{"properties": {}}]},  # data, not schemas
], ids=["free-form", "true", "schema", "unevaluated", "all-of", "one-of-beside-keys", "ref-beside-keys", "data"])
def test_open_or_combined_objects_are_left_alone(schema):
    assert close_objects(schema) == schema


def test_a_property_named_like_a_keyword_is_a_schema_not_a_keyword():
    schema = {"type": "object", "properties": {"properties": OBJ, "items": {"type": "string"}}}
    assert close_objects(schema)["properties"]["properties"] == {**OBJ, **CLOSED}


def test_refs_follow_the_schema_into_its_new_place():
    schema = {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"type": "integer"}},
              "properties": {"a": {"$ref": "#/$defs/A"}, "self": {"$ref": "#"}, "far": {"$ref": "other.json#/x"}},
              "const": {"$ref": "#/not/a/ref"}}
    moved = rebase_refs(schema, "#/anyOf/1/properties/arguments")
    assert moved["$defs"]["A"] == {"$ref": "#/anyOf/1/properties/arguments/$defs/B"}
    assert moved["properties"] == {"a": {"$ref": "#/anyOf/1/properties/arguments/$defs/A"},
                                   "self": {"$ref": "#/anyOf/1/properties/arguments"},
                                   "far": {"$ref": "other.json#/x"}}
    assert moved["const"] == schema["const"] and schema["$defs"]["A"] == {"$ref": "#/$defs/B"}  # a copy
