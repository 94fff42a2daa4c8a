"""The Responses API's building blocks, before its routes: request bodies as the `openai` SDK and the
openai-agents SDK send them, items into chat messages, and output the SDK's `Response` type parses.
(The endpoints and their SDK tests come with the routes: issue 12.)"""

from __future__ import annotations

import pytest
from openai.types.responses import Response
from pydantic import ValidationError

from ember.api.responses_protocol import ResponsesRequest
from ember.serving.errors import FieldError
from ember.serving.generate import ChoiceEvent
from ember.serving.responses import chat_messages, input_items, output_items, response_object, usage
from ember.serving.tools import Tool, ToolCallDelta, tool_grammar

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": True}


def test_request_bodies_as_the_sdks_send_them():
    plain = ResponsesRequest.model_validate({"model": "m", "input": "Hello"})
    assert plain.store and not plain.stream and plain.input == "Hello"
    agents = ResponsesRequest.model_validate({  # the openai-agents SDK's default model sends include: []
        "model": "m", "include": [], "instructions": "Be brief.", "tools": [WEATHER], "tool_choice": "required",
        "parallel_tool_calls": False, "text": {"format": {"type": "text"}}, "store": True, "stream": False,
        "input": [{"role": "user", "content": "Weather in Paris?"},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}]}]})
    assert [t.name for t in agents.function_tools] == ["get_weather"]
    schema = ResponsesRequest.model_validate({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}}, "top_k": 5,
        "metadata": {"k": "v"}, "max_output_tokens": 8, "reasoning": {"effort": "low"}})
    assert schema.text.format.schema_ == {"type": "object"} and schema.top_k == 5


@pytest.mark.parametrize("body,where", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"background": True}, "background"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "type"),
    ({"temperature": 3}, "temperature"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_bad_fields_name_themselves(body, where):
    with pytest.raises(ValidationError) as caught:
        ResponsesRequest.model_validate({"model": "m", "input": "x", **body})
    paths = []
    for error in caught.value.errors():  # a union reports each branch's error
        raised = (error.get("ctx") or {}).get("error")
        paths.append(".".join([*map(str, error["loc"]), *([raised.field] if isinstance(raised, FieldError) else [])]))
    assert any(where in path for path in paths), paths


def test_items_become_chat_messages_in_order():
    request = ResponsesRequest.model_validate({"model": "m", "input": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]}]})
    items = input_items(request.input)
    assert [i["id"][:3] for i in items] == ["msg", "fc_", "fc_", "fc_", "fc_"]
    messages = chat_messages("Be brief.", items)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]  # consecutive calls: one message
    assert messages[4] == {"role": "tool", "tool_call_id": "c2", "content": "rain"}
    assert chat_messages(None, input_items("hi")) == [{"role": "user", "content": "hi"}]


def test_output_parses_as_the_sdks_response():
    request = ResponsesRequest.model_validate({"model": "m", "input": "x", "tools": [WEATHER],
                                               "max_output_tokens": 4})
    text = ChoiceEvent(0, "Hello there", "length")
    obj = response_object("resp_1", request, output_items(text), "length", usage(10, 4, 4))
    parsed = Response.model_validate(obj)
    assert parsed.output_text == "Hello there" and parsed.status == "incomplete"
    assert parsed.incomplete_details.reason == "max_output_tokens"
    assert parsed.usage.input_tokens_details.cached_tokens == 4 and parsed.usage.total_tokens == 14
    call = ChoiceEvent(0, "", "tool_calls", tool_calls=[ToolCallDelta(0, "call_9", "get_weather", "{\"city\": "),
                                                        ToolCallDelta(0, None, None, "\"Paris\"}")])
    parsed = Response.model_validate(response_object("resp_2", request, output_items(call), "tool_calls", None))
    (item,) = parsed.output
    assert item.type == "function_call" and item.call_id == "call_9" and item.arguments == "{\"city\": \"Paris\"}"
    assert parsed.status == "completed" and parsed.tools[0].name == "get_weather"


def test_max_tool_calls_bounds_the_calls_the_grammar_allows():
    tools = [Tool("f", {"type": "object"}, None)]
    assert '("\\n" call){0,1}' in tool_grammar(tools, "auto", True, max_calls=2).source
    assert "calls: call\n" in tool_grammar(tools, "auto", True, max_calls=1).source
    assert '("\\n" call){0,7}' in tool_grammar(tools, "auto", True).source  # MAX_PARALLEL_CALLS without it
