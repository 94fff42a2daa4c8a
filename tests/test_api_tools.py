"""Tool calling over /v1/chat/completions: `tools`, every `tool_choice` form, `parallel_tool_calls` and the
legacy `functions`/`function_call`, streamed and not.

What a client relies on: a required or named call is always a listed function with arguments that are
JSON valid against that function's parameters schema (checked strictly with pydantic models, whose
schemas are the ones sent); `finish_reason` is "tool_calls" exactly when calls came back; streamed
calls arrive as OpenAI deltas (id, type and name once, then argument fragments only) that add up to the
non-streamed answer, with no Hermes `<tool_call>` markup leaking into the content; a tool result can be
sent back; and mistakes are 400s naming the field.
"""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.server import MODEL


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Weather(_Args):
    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


class Add(_Args):
    a: float
    b: float


class Search(_Args):
    query: str = Field(max_length=40)
    limit: int = Field(ge=1, le=10)


ARGS: dict[str, type[_Args]] = {"get_weather": Weather, "add": Add, "search": Search}
DESCRIPTIONS = {"get_weather": "Current weather in a city", "add": "Adds two numbers",
                "search": "Searches the web"}
TOOLS = [{"type": "function", "function": {"name": name, "description": DESCRIPTIONS[name],
                                           "parameters": model.model_json_schema()}}
         for name, model in ARGS.items()]
ASKS = {"get_weather": "What is the weather like in Paris right now?", "add": "What is 12 plus 30?",
        "search": "Find me some pasta recipes online."}
CHAT_CHAT = [{"role": "user", "content": "Hi! How are you today?"}]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _body(messages: list[dict], **fields) -> dict:
    return {"model": MODEL, "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 120, **fields}


def _post(server, body: dict) -> dict:
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def _check_calls(calls: list[dict], allowed: set[str]) -> None:
    """Each call is well formed, of an allowed function, with arguments valid against its schema."""
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] in allowed, call
        ARGS[call["function"]["name"]].model_validate_json(call["function"]["arguments"], strict=True)
    assert len({c["id"] for c in calls}) == len(calls)


def _check_outcome(reason: str, content: str | None, calls: list[dict] | None) -> None:
    """finish_reason "tool_calls" iff complete calls came back; a call cut off by max_tokens ends in "length"."""
    if reason == "tool_calls":
        _check_calls(calls, set(ARGS))
        assert not content
    else:
        assert reason in ("stop", "length"), reason
        if reason == "stop":
            assert content and not calls and "<tool_call" not in content


def _streamed(events: list[dict]) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) of a one-choice stream, checking the delta rules on the way."""
    content, calls, reasons = "", [], []
    for event in events:
        if not event["choices"]:
            continue
        choice = event["choices"][0]
        delta = choice["delta"]
        piece = delta.get("content") or ""
        assert "<tool_call>" not in piece and "</tool_call>" not in piece, piece
        content += piece
        for tc in delta.get("tool_calls") or []:
            i = tc["index"]
            if i == len(calls):  # the first delta of a call: id, type and name
                assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["name"], tc
                calls.append({"id": tc["id"], "type": "function",
                              "function": {"name": tc["function"]["name"],
                                           "arguments": tc["function"].get("arguments") or ""}})
            else:  # later ones: argument text only
                assert i == len(calls) - 1, (i, len(calls))
                assert tc.get("id") is None and tc.get("type") is None and tc["function"].get("name") is None, tc
                calls[i]["function"]["arguments"] += tc["function"]["arguments"]
        if choice["finish_reason"]:
            reasons.append(choice["finish_reason"])
    assert len(reasons) == 1, reasons
    assert "<tool_call" not in content and "</tool_call" not in content
    return content, calls, reasons[0]


CHOICES = [*(("named", n) for n in ARGS), ("required", "get_weather"), ("required", "add")]


@pytest.mark.parametrize("kind,name", CHOICES, ids=[f"{k}-{n}" for k, n in CHOICES])
def test_required_and_named_choices_give_valid_calls_streamed_and_not(server, kind, name):
    """Greedy, so the stream must rebuild exactly the non-streamed calls (ids aside). `required` goes with
    parallel_tool_calls false: greedy, this model repeats its call until max_tokens otherwise."""
    fields = ({"tool_choice": {"type": "function", "function": {"name": name}}} if kind == "named"
              else {"tool_choice": "required", "parallel_tool_calls": False})
    body = _body(_user(ASKS[name]), **fields)
    choice = _post(server, body)["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["role"] == "assistant"
    assert message["content"] is None
    _check_calls(message["tool_calls"], {name} if kind == "named" else set(ARGS))
    content, calls, reason = _streamed(server.stream("/v1/chat/completions", body))
    assert reason == "tool_calls" and content == ""
    assert [c["function"] for c in calls] == [c["function"] for c in message["tool_calls"]]


# a seed at which the model calls get_weather several times, when parallel calls are allowed; room for all
# MAX_PARALLEL_CALLS calls (about 37 tokens each), so the answer ends with its calls whatever their number
PARALLEL = _body(_user("What is the weather in Paris, in London and in Tokyo?"), tool_choice="required",
                 temperature=1, seed=5, max_tokens=320)


@pytest.fixture(scope="module")
def parallel_answer(server) -> dict:
    choice = _post(server, PARALLEL)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) >= 2, choice
    _check_calls(choice["message"]["tool_calls"], set(ARGS))
    return choice


def test_parallel_calls_stream_with_their_own_indices(server, parallel_answer):
    _, calls, reason = _streamed(server.stream("/v1/chat/completions", PARALLEL))
    assert reason == "tool_calls"
    assert [c["function"] for c in calls] == [c["function"] for c in parallel_answer["message"]["tool_calls"]]


def test_parallel_tool_calls_false_allows_one_call(server, parallel_answer):
    """The same seeded request that made several calls makes exactly one with parallel_tool_calls false."""
    for choice in _post(server, {**PARALLEL, "parallel_tool_calls": False, "n": 3})["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert len(choice["message"]["tool_calls"]) == 1
        _check_calls(choice["message"]["tool_calls"], set(ARGS))


def test_the_openai_sdk_reads_calls(server):
    resp = server.client().chat.completions.create(model=MODEL, messages=_user(ASKS["add"]), tools=TOOLS,
                                                   tool_choice={"type": "function", "function": {"name": "add"}},
                                                   temperature=0, max_tokens=60)
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and resp.choices[0].finish_reason == "tool_calls"
    Add.model_validate_json(call.function.arguments, strict=True)
    streamed: dict[int, str] = {}
    for chunk in server.client().chat.completions.create(
            model=MODEL, messages=_user(ASKS["add"]), tools=TOOLS, stream=True, temperature=0, max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "add"}}):
        for tc in (chunk.choices[0].delta.tool_calls if chunk.choices else None) or []:
            streamed[tc.index] = streamed.get(tc.index, "") + (tc.function.arguments or "")
    assert streamed[0] == call.function.arguments


def _answer(server, body: dict, stream: bool) -> tuple[str | None, list[dict] | None, str]:
    """(content, calls, finish_reason) of a one-choice answer, streamed (delta rules checked) or not."""
    if stream:
        return _streamed(server.stream("/v1/chat/completions", body))
    choice = _post(server, body)["choices"][0]
    return choice["message"]["content"], choice["message"].get("tool_calls"), choice["finish_reason"]


@pytest.mark.parametrize("stream", [False, True])
def test_none_gives_text_and_no_calls(server, stream):
    content, calls, reason = _answer(server, _body(_user(ASKS["get_weather"]), tool_choice="none", max_tokens=24),
                                     stream)
    assert content and not calls and reason in ("stop", "length")
    assert "<tool_call" not in content


@pytest.mark.parametrize("ask,stream", [(CHAT_CHAT, False), (_user(ASKS["search"]), True)],
                         ids=["chit-chat", "search-streamed"])
def test_auto_gives_text_or_valid_calls(server, ask, stream):
    content, calls, reason = _answer(server, _body(ask, tool_choice="auto", max_tokens=40), stream)
    _check_outcome(reason, content, calls)
    if not calls:
        assert content and "<tool_call" not in content


def test_any_is_an_alias_of_required(server):
    body = _body(_user(ASKS["search"]), n=3, temperature=1, seed=5, parallel_tool_calls=False)
    required = _post(server, {**body, "tool_choice": "required"})["choices"]
    alias = _post(server, {**body, "tool_choice": "any"})["choices"]
    for choice in alias:
        assert choice["finish_reason"] == "tool_calls"
        _check_calls(choice["message"]["tool_calls"], set(ARGS))
    calls = [[c["function"] for c in choice["message"]["tool_calls"]] for choice in required]
    assert calls == [[c["function"] for c in choice["message"]["tool_calls"]] for choice in alias]


def test_legacy_functions_are_converted_to_tools(server):
    functions = [t["function"] for t in TOOLS]
    body = {"model": MODEL, "messages": _user(ASKS["add"]), "functions": functions, "temperature": 0,
            "max_tokens": 60}
    named = _post(server, {**body, "function_call": {"name": "get_weather"}})["choices"][0]
    assert named["finish_reason"] == "tool_calls"
    _check_calls(named["message"]["tool_calls"], {"get_weather"})
    plain = _post(server, {**body, "function_call": "none"})["choices"][0]
    assert plain["message"]["content"] and not plain["message"].get("tool_calls")


def test_a_tool_result_round_trip(server):
    messages = _user(ASKS["get_weather"])
    first = _post(server, _body(messages, tool_choice="required", parallel_tool_calls=False))["choices"][0]["message"]
    _check_calls(first["tool_calls"], set(ARGS))
    messages = [*messages, {"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
                *({"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"result": "sunny, 21 C"})}
                  for c in first["tool_calls"])]
    # the result comes back into the prompt: it is longer than the first request's
    first_prompt = _post(server, _body(messages[:1], tool_choice="none", max_tokens=1))["usage"]["prompt_tokens"]
    answer = _post(server, _body(messages, tool_choice="none", max_tokens=40))
    assert answer["usage"]["prompt_tokens"] > first_prompt + 10
    message = answer["choices"][0]["message"]
    assert message["content"] and not message.get("tool_calls")
    again = _post(server, _body(messages, tool_choice="auto", max_tokens=60))["choices"][0]
    _check_outcome(again["finish_reason"], again["message"]["content"], again["message"].get("tool_calls"))


BAD_TOOLS = [
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
                 id="unknown-name"),
    pytest.param({"tools": None, "tool_choice": "required"}, "tool_choice", id="required-no-tools"),
    pytest.param({"tools": None, "tool_choice": {"type": "function", "function": {"name": "add"}}},
                 "tool_choice", id="named-no-tools"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                  "tool_choice": "required"}, "tools", id="bad-schema"),
    pytest.param({"tools": [*TOOLS, TOOLS[0]]}, "tools", id="duplicate-names"),
    pytest.param({"tool_choice": "sometimes"}, "tool_choice", id="bad-choice"),
    pytest.param({"tools": None, "functions": [t["function"] for t in TOOLS], "function_call": {"name": "nope"}},
                 "function_call", id="legacy-unknown-name"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields,param", BAD_TOOLS)
def test_tool_mistakes_are_400s(server, fields, param, stream):
    body = {k: v for k, v in {**_body(_user("Hi"), stream=stream), **fields}.items() if v is not None}
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["param"].startswith(param), error
