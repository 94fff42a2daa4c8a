"""What clients and peer servers expect of the wire, through a real server: tool schemas with `$defs`
(pydantic's nested models and enums) in every tool_choice mode, objects closed unless their schema says
`additionalProperties`, every documented OpenAI request field accepted (neutral values ignored, others
a 400 saying they are not supported), SDK replays of `message.model_dump()`, `top_logprobs` up to 20,
`stream_options` only with a stream, replayed calls with malformed arguments refused, a stable
`system_fingerprint`, and replies cut mid-character that do not end in U+FFFD."""

from __future__ import annotations

import json
from enum import StrEnum

import openai
import pytest
from fireworks.types import completion_create_params as fw_completion
from fireworks.types.chat import completion_create_params as fw_chat
from fireworks.types.shared_params.chat_message import ChatMessage as FwMessage
from openai.types import completion_create_params as oa_completion
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionFunctionMessageParam,
    ChatCompletionMessage,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat import completion_create_params as oa_chat
from pydantic import BaseModel, Field

from tests.server import MODEL

CHAT = [{"role": "user", "content": "Hi"}]


class Unit(StrEnum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Place(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


class Forecast(BaseModel):
    """Weather forecast for a place. Nested model and enum: the schema has $defs and $refs."""

    place: Place
    unit: Unit
    days: int = Field(ge=1, le=7)


FORECAST = openai.pydantic_function_tool(Forecast)
ASK_FORECAST = [{"role": "user", "content": "What will the weather be in Paris, France for the next 3 days?"}]


def _error(response, param: str, code: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    return error


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "Forecast"}}],
                         ids=["required", "named"])
def test_pydantic_function_tool_with_defs_gives_valid_calls(server, choice):
    """openai.pydantic_function_tool writes `#/$defs/...` refs; the SDK's parse validates the arguments."""
    resp = server.client().chat.completions.parse(
        model=MODEL, messages=ASK_FORECAST, tools=[FORECAST], tool_choice=choice, parallel_tool_calls=False,
        temperature=0, max_tokens=80)
    choice0 = resp.choices[0]
    assert choice0.finish_reason == "tool_calls", choice0
    parsed = choice0.message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Forecast) and isinstance(parsed.place, Place) and isinstance(parsed.unit, Unit)


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_defs_are_accepted_in_the_other_tool_choice_modes(server, choice):
    resp = server.client().chat.completions.create(model=MODEL, messages=ASK_FORECAST, tools=[FORECAST],
                                                   tool_choice=choice, temperature=0, max_tokens=60)
    for call in resp.choices[0].message.tool_calls or []:
        Forecast.model_validate_json(call.function.arguments)


def test_defs_of_two_tools_resolve_each_in_its_own_place(server):
    """Two tools whose `$defs` both hold a `Place`, of different shapes: whichever is called, its
    arguments validate against its own tool's definition."""
    class Place(BaseModel):  # noqa: F811 (the point: the same $defs name as Forecast's)
        code: int = Field(ge=0, le=9)

    class Lookup(BaseModel):
        place: Place

    for tools in ([openai.pydantic_function_tool(Lookup), FORECAST], [FORECAST, openai.pydantic_function_tool(Lookup)]):
        assert "Place" in tools[0]["function"]["parameters"]["$defs"]
        for name in ("Lookup", "Forecast"):
            resp = server.client().chat.completions.parse(
                model=MODEL, messages=ASK_FORECAST, tools=tools, temperature=0, max_tokens=80,
                tool_choice={"type": "function", "function": {"name": name}})
            parsed = resp.choices[0].message.tool_calls[0].function.parsed_arguments
            assert type(parsed).__name__ == name and isinstance(parsed.place, BaseModel), parsed


# a schema without additionalProperties, and a logit_bias that makes the model want another key: only a
# closed object keeps the answer to the listed key
OPEN_BY_OMISSION = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                    "required": ["city"]}


def _pushy(tokenizer) -> dict:
    """A bias towards `",`: the model continues an object with another key whenever it may."""
    (comma,) = tokenizer.encode(",", add_special_tokens=False)
    return {"logit_bias": {str(comma): 100}, "temperature": 0, "max_tokens": 40}


def _json_answer(server, schema: dict, tokenizer) -> tuple[str, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a city as JSON."}], **_pushy(tokenizer),
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    choice = server.post("/v1/chat/completions", body).json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def _tool_arguments(server, schema: dict, tokenizer) -> tuple[str, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Where is it?"}], **_pushy(tokenizer),
            "tools": [{"type": "function", "function": {"name": "where", "parameters": schema}}],
            "tool_choice": "required", "parallel_tool_calls": False}
    choice = server.post("/v1/chat/completions", body).json()["choices"][0]
    return choice["message"]["tool_calls"][0]["function"]["arguments"], choice["finish_reason"]


@pytest.mark.parametrize("answer", [_json_answer, _tool_arguments], ids=["response_format", "tools"])
def test_objects_are_closed_unless_the_schema_opens_them(server, tokenizer, answer):
    text, reason = answer(server, OPEN_BY_OMISSION, tokenizer)
    assert set(json.loads(text)) == {"city"} and reason in ("stop", "tool_calls"), text
    text, reason = answer(server, {**OPEN_BY_OMISSION, "additionalProperties": True}, tokenizer)
    assert reason == "length" and not text.endswith("}"), text  # more keys, until max_tokens


# OpenAI's request fields at a value that changes nothing, and at one Ember cannot honour
NEUTRAL = [
    {"store": False}, {"store": None}, {"modalities": ["text"]}, {"modalities": None}, {"audio": None},
    {"safety_identifier": "user-1234"}, {"verbosity": "medium"}, {"verbosity": None},
    {"web_search_options": None}, {"moderation": None}, {"prompt_cache_retention": "in_memory"},
    {"prompt_cache_retention": "24h"}, {"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}},
    {"service_tier": "scale"}, {"stream": False, "stream_options": None},
]
UNSUPPORTED = [
    ({"store": True}, "store"), ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"), ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"), ({"moderation": {"model": "m"}}, "moderation"),
    ({"prompt_cache_options": {"mode": "explicit"}}, "prompt_cache_options.mode"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].custom"),
    ({"tools": [FORECAST], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "Forecast"}}]}}}, "tool_choice.allowed_tools"),
    ({"tools": [FORECAST], "tool_choice": {"type": "custom", "custom": {"name": "Forecast"}}}, "tool_choice.custom"),
    ({"messages": [*CHAT, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "custom", "custom": {"name": "f", "input": "x"}}]}]}, "messages[1].tool_calls[0].custom"),
]
COMPLETION_NEUTRAL = [{"best_of": 1}, {"best_of": None}, {"suffix": ""}, {"suffix": None},
                      {"safety_identifier": "u"}, {"prompt_cache_retention": "in_memory"}]
COMPLETION_UNSUPPORTED = [({"best_of": 3}, "best_of"), ({"suffix": "end."}, "suffix")]


@pytest.mark.parametrize("fields", NEUTRAL, ids=lambda f: json.dumps(f))
def test_neutral_openai_fields_are_accepted(server, fields):
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2, **fields})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fields,param", UNSUPPORTED, ids=lambda f: json.dumps(f))
def test_openai_fields_ember_cannot_honour_are_400s(server, fields, param):
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2, **fields})
    assert "not supported" in _error(r, param, "unsupported_parameter")["message"]


@pytest.mark.parametrize("fields", COMPLETION_NEUTRAL, ids=lambda f: json.dumps(f))
def test_neutral_completion_fields_are_accepted(server, fields):
    r = server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fields,param", COMPLETION_UNSUPPORTED, ids=lambda f: json.dumps(f))
def test_completion_fields_ember_cannot_honour_are_400s(server, fields, param):
    r = server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields})
    _error(r, param, "unsupported_parameter")


def test_fields_of_neither_schema_are_still_unknown(server):
    _error(server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "store": False}), "store",
           "unknown_field")  # a chat field
    _error(server.post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "obfuscate": True}),
           "obfuscate", "unknown_field")


def test_the_sdk_sends_the_newer_fields(server):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, store=False, modalities=["text"], safety_identifier="u-1",
        verbosity="medium", prompt_cache_retention="in_memory", stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False})
    assert [c.usage for c in stream][-1].completion_tokens == 4


def test_replaying_model_dump_continues_the_conversation(server):
    """The SDK's usual way to continue: the assistant message as `message.model_dump()`, with its
    `annotations`, `audio`, `refusal` and `function_call` nulls, plain and with tool calls."""
    client = server.client()
    messages: list = [{"role": "user", "content": "Say hello."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    dumped = first.choices[0].message.model_dump()
    assert {"annotations", "audio", "refusal", "function_call"} <= set(dumped)
    messages += [dumped, {"role": "user", "content": "Again."}]
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4).choices
    called = client.chat.completions.create(model=MODEL, messages=ASK_FORECAST, tools=[FORECAST],
                                            tool_choice="required", parallel_tool_calls=False, temperature=0,
                                            max_tokens=80).choices[0].message
    replay = [*ASK_FORECAST, called.model_dump(),
              {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": "sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=replay, tools=[FORECAST], max_tokens=4)
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_an_earlier_audio_answer_is_not_supported(server):
    messages = [*CHAT, {"role": "assistant", "content": None, "audio": {"id": "audio_1"}}, *CHAT]
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    _error(r, "messages[1].audio", "unsupported_parameter")


def _calling(arguments: str) -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "Forecast", "arguments": arguments}}
    return [*ASK_FORECAST, {"role": "assistant", "content": None, "tool_calls": [call]}]


@pytest.mark.parametrize("arguments", ['{"place": ', "[1, 2]", "not json", "[" * 5000])
def test_a_replayed_call_with_malformed_arguments_is_a_400(server, arguments):
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": _calling(arguments), "max_tokens": 2})
    _error(r, "messages[1].tool_calls[0].function.arguments", "invalid_value")


def test_a_replayed_call_with_good_arguments_is_accepted(server):
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": _calling('{"days": 3}'), "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_top_logprobs_up_to_20(server, path):
    body = {"model": MODEL, "max_tokens": 3, "logprobs": True, "top_logprobs": 20,
            **({"messages": CHAT} if "chat" in path else {"prompt": "Hi"})}
    r = server.post(path, body)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3 and all(len(e["top_logprobs"]) == 20 for e in entries)
    _error(server.post(path, {**body, "top_logprobs": 21}), "top_logprobs", "invalid_value")


@pytest.mark.parametrize("stream", [False, None], ids=["false", "absent"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_options_need_a_stream(server, path, stream):
    body = {"model": MODEL, "max_tokens": 2, "stream_options": {"include_usage": True},
            **({"messages": CHAT} if "chat" in path else {"prompt": "Hi"})}
    if stream is not None:
        body["stream"] = stream
    _error(server.post(path, body), "stream_options", "invalid_value")


def test_system_fingerprint_is_stable_per_model_on_every_response_and_chunk(server, tiny_server):
    client = server.client()
    first = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).system_fingerprint
    assert first and first.startswith("fp_")
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).system_fingerprint == first
    for path, body in [("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Hi"})]:
        events = server.stream(path, {"model": MODEL, "max_tokens": 3, "stream_options": {"include_usage": True},
                                      **body})
        assert {e.get("system_fingerprint") for e in events} == {first}
    other = tiny_server.post("/v1/completions", {"model": tiny_server.model, "prompt": "Hi", "max_tokens": 1})
    assert other.json()["system_fingerprint"] not in (None, first)  # another model


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_reply_cut_mid_character_holds_the_partial_bytes_back(server, tokenizer, path, stream):
    """max_tokens 1 on the first of an emoji's byte tokens: the reply is empty, not U+FFFD."""
    first, *rest = tokenizer.encode("🔥", add_special_tokens=False)
    assert rest and tokenizer.token_bytes(first).decode("utf-8", errors="ignore") == ""
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0, "logit_bias": {str(first): 100},
            "return_token_ids": True, **({"messages": CHAT} if "chat" in path else {"prompt": "Fire:"})}
    if stream:
        choices = [c for e in server.stream(path, body) for c in e["choices"]]
    else:
        choices = server.post(path, body).json()["choices"]
    text = "".join((c.get("message") or c.get("delta") or {}).get("content") or c.get("text") or ""
                   for c in choices)
    assert [t for c in choices for t in c.get("token_ids") or []] == [first]
    assert text == "" and choices[-1]["finish_reason"] == "length"


def _sdk_fields(*typed_dicts: type) -> set[str]:
    return {k for td in typed_dicts for base in td.__mro__ for k in getattr(base, "__annotations__", {})}


def _sdk_request_fields() -> list[tuple[str, str]]:
    """(path, field) for every request field of the openai and fireworks-ai SDKs' create params."""
    chat = _sdk_fields(oa_chat.CompletionCreateParamsNonStreaming, fw_chat.CompletionCreateParamsNonStreaming)
    text = _sdk_fields(oa_completion.CompletionCreateParamsNonStreaming,
                       fw_completion.CompletionCreateParamsNonStreaming)
    required = {"model", "messages", "prompt"}
    return [("/v1/chat/completions", f) for f in sorted(chat - required)] + \
        [("/v1/completions", f) for f in sorted(text - required)]


@pytest.mark.parametrize("path,field", _sdk_request_fields())
def test_every_sdk_request_field_is_known(server, path, field):
    """At null (neutral for all but a few non-nullable ones, which are then a type error): never unknown."""
    limit = "max_completion_tokens" if field == "max_tokens" else "max_tokens"
    body = {"model": MODEL, limit: 1, field: None, **({"messages": CHAT} if "chat" in path else {"prompt": "Hi"})}
    r = server.post(path, body)
    assert r.status_code == 200 or r.json()["error"]["code"] != "unknown_field", r.text


def test_every_sdk_message_field_is_known(server):
    """Every field of every message type of both SDKs, and of the SDK's response message (model_dump)."""
    fields = _sdk_fields(ChatCompletionAssistantMessageParam, ChatCompletionDeveloperMessageParam,
                         ChatCompletionFunctionMessageParam, ChatCompletionSystemMessageParam,
                         ChatCompletionToolMessageParam, ChatCompletionUserMessageParam, FwMessage)
    fields |= set(ChatCompletionMessage.model_fields)
    message = {"role": "assistant", "content": "Hello", **{f: None for f in fields - {"role", "content"}}}
    body = {"model": MODEL, "max_tokens": 1, "messages": [*CHAT, message, *CHAT]}
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
