"""Input that used to cost a 500 (and the keep-alive connection with it): lone UTF-16 surrogates,
deeply nested JSON (in the body, and in JSON text the server parses again), and numbers at the edges
of float32. Each is a 4xx with the error envelope naming the field, or an answer that stays sane,
and the connection and the KV cache are fine afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server import MODEL

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LONE = "\ud800"


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **fields}


def _tool(name: str = "f", **function) -> list[dict]:
    return [{"type": "function", "function": {"name": name, **function}}]


def _wire(body: dict) -> dict:
    """Request arguments sending `body` as a client's JSON encoder would: a lone surrogate as the escape
    `\\ud800` (legal JSON; httpx's own encoder cannot write it at all)."""
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


def _check(response: httpx.Response, param: str | None, code: str = "invalid_value") -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]  # the error itself encodes: a 500 here would have no JSON body
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and (error["param"], error["code"]) == (param, code), error
    return error


SURROGATES = [
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": f"a{LONE}b"}]), "messages[0].content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
     "messages[0].content[0].text"),
    ("/v1/chat/completions", chat(model=LONE), "model"),
    ("/v1/chat/completions", chat(tools=_tool(f"x{LONE}")), "tools[0].function.name"),
    ("/v1/chat/completions", chat(tools=_tool(description=LONE)), "tools[0].function.description"),
    ("/v1/chat/completions", chat(stop=["\udfff"]), "stop[0]"),
    ("/v1/chat/completions", chat(user=LONE), "user"),
    ("/v1/completions", completion(prompt=f"x{LONE}"), "prompt"),
    ("/v1/completions", completion(prompt=["ok", LONE]), "prompt[1]"),
    ("/v1/completions", completion(model=f"accounts/fireworks/models/{LONE}"), "model"),
]


@pytest.mark.parametrize("path,body,param", SURROGATES, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(SURROGATES)])
def test_lone_surrogates_are_400s_naming_the_field(server, path, body, param):
    _check(httpx.post(f"{server.url}{path}", **_wire(body), timeout=60), param)


def test_a_surrogate_in_a_key_is_named_escaped(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", **_wire(chat(metadata={LONE: "x"})), timeout=60)
    error = _check(r, "metadata.\\ud800")
    assert "surrogate" in error["message"]


def test_the_connection_survives_bad_input(server):
    """A 500 used to drop the keep-alive connection, failing the next innocent request on it."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path, body, _ in SURROGATES:
            assert client.post(path, **_wire(body)).status_code == 400
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert server.wait_idle()["kv_blocks_used"] == 0


def _nested(depth: int) -> dict:
    """{"type": "object", "properties": {"a": {...}}} `depth` objects deep."""
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


DEEP = "[" * 100_000 + "]" * 100_000
NESTING = [  # the body, or the JSON text inside it, and the field named (deep values: where they pass the limit)
    (chat(response_format={"type": "json_object", "schema": DEEP}), "response_format.schema"),
    (chat(response_format={"type": "json_schema", "json_schema": DEEP}), "response_format.json_schema"),
    (chat(response_format={"type": "json_object", "schema": json.dumps(_nested(60))}), "response_format.schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(60)}}),
     "response_format.json_schema.schema.properties.a.properties.a."),
    (chat(tools=_tool(parameters=_nested(60))), "tools[0].function.parameters.properties.a.properties.a."),
    (chat(messages=[*CHAT, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": DEEP}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("body,param", NESTING, ids=["schema-string", "json_schema-string", "schema-string-60",
                                                     "schema-object-60", "tool-parameters-60", "arguments"])
def test_deeply_nested_json_is_a_400(server, body, param):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and error["code"] == "invalid_value", error
    assert "deeper than" in error["message"]


def test_nesting_within_the_limit_still_compiles(server):
    body = chat(response_format={"type": "json_object", "schema": json.dumps(_nested(20))}, max_tokens=2)
    assert server.post("/v1/chat/completions", body).status_code == 200


def test_a_body_nested_past_the_parser_is_a_400(server):
    raw = json.dumps(chat(metadata="X")).replace('"X"', DEEP).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    _check(r, None, "invalid_body")


def _text(server, **fields) -> str:
    r = server.post("/v1/chat/completions", chat(max_tokens=12, **fields))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-30, 1e-6])
def test_a_vanishing_temperature_is_greedy(server, temperature):
    """Dividing float32 logits by these overflowed to inf (NaN probabilities, garbage tokens)."""
    assert _text(server, temperature=temperature) == _text(server, temperature=0)


# every float the sampler sees, at the edges of float32 (and past them, for float64); finite answers or 400s
EXTREMES = [1e-45, 5e-324, 1e-300, 3.5e38, 1e308, -1e-45, -1e308]
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "frequency_penalty",
                "presence_penalty", "mirostat_target", "mirostat_lr"]


@pytest.mark.parametrize("value", EXTREMES)
@pytest.mark.parametrize("field", [*FLOAT_FIELDS, "logit_bias"])
def test_extreme_numbers_give_a_sane_answer_or_a_400(server, field, value):
    body = chat(seed=1, logprobs=True, **({field: value} if field != "logit_bias" else {field: {"100": value}}))
    r = server.post("/v1/chat/completions", body)
    if r.status_code == 400:
        assert r.json()["error"]["param"] == field, r.text
        return
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    # sampled from finite probabilities: no token the model all but rules out (NaN probabilities draw
    # those; all tokens below e^-20 together weigh at most 49152 * e^-20 = 1e-4)
    assert all(e["logprob"] > -20 for e in choice["logprobs"]["content"]), choice


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "mirostat_target", "frequency_penalty"])
def test_non_finite_json_literals_are_400s(server, field, literal):
    raw = json.dumps(chat(**{field: "X"})).replace('"X"', literal).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    _check(r, field)


def test_numbers_too_long_to_convert_are_400s(server):
    """CPython's int() refuses more than 4300 digits: in a logit_bias key, and in the body itself."""
    _check(server.post("/v1/completions", completion(logit_bias={"9" * 5000: 1})), "logit_bias")
    raw = json.dumps(completion(seed="X")).replace('"X"', "9" * 5000).encode()
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    _check(r, None, "invalid_body")


def test_repetition_penalty_that_would_overflow_is_a_400(server):
    error = _check(server.post("/v1/chat/completions", chat(repetition_penalty=1e-300)), "repetition_penalty")
    assert "0.01" in error["message"]
    assert server.post("/v1/chat/completions", chat(repetition_penalty=0.01)).status_code == 200


# a bounded fuzz: every top-level field of both endpoints at every kind of wrong or extreme value
FUZZ_VALUES = ["x", "", 1.5, -1, 0, 10**30, -(10**30), 1e308, -1e-45, True, None, [], {}, [None], {"a": LONE},
               {"9" * 5000: 1}, LONE, json.loads("[" * 150 + "]" * 150)]


@pytest.mark.parametrize("path,model", [("/v1/chat/completions", "ChatCompletionRequest"),
                                        ("/v1/completions", "CompletionRequest")])
def test_fuzzed_fields_never_cost_a_5xx(server, path, model):
    """Never a 5xx; a 4xx always in the error shape, naming the fuzzed field; the server idle after."""
    from ember.api import protocol

    schema = getattr(protocol, model)
    fields = sorted({f.alias or name for name, f in schema.model_fields.items()} | set(schema.not_yet))
    base = chat(max_tokens=1) if "chat" in path else completion(max_tokens=1)
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for field in fields:
            for value in FUZZ_VALUES:
                body = {**base, field: value}
                if field in ("max_tokens", "max_completion_tokens"):
                    if value is None or value == 10**30:
                        continue  # valid, and a generation as long as the context: not what this is about
                    body = {**{k: v for k, v in base.items() if k != "max_tokens"}, field: value}
                r = client.post(path, **_wire(body))
                error = r.json().get("error") if r.status_code >= 400 else None
                param = (error or {}).get("param") or ""
                named = param == field or param.startswith((f"{field}.", f"{field}["))
                if r.status_code >= 500 or (error is not None and (set(error) != {"message", "type", "param", "code"}
                                                                    or not named)):
                    failures.append((field, repr(value)[:40], r.status_code, r.text[:200]))
    assert not failures, "\n".join(map(str, failures))
    stats = server.wait_idle()
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0, stats


# the objects inside a chat request: (where, how a value gets there, its model in ember.api.protocol)
NESTED = [
    ("messages[0]", lambda kv: {"messages": [{"role": "user", "content": "Hi", **kv}]}, "ChatMessage"),
    ("tools[0].function", lambda kv: {"tools": [{"type": "function", "function": {"name": "f", **kv}}]},
     "FunctionDef"),
    ("response_format", lambda kv: {"response_format": {"type": "json_object", **kv}}, "ResponseFormat"),
    ("stream_options", lambda kv: {"stream": True, "stream_options": kv}, "StreamOptions"),
]


@pytest.mark.parametrize("where,place,model", NESTED, ids=[w for w, _, _ in NESTED])
def test_fuzzed_nested_fields_never_cost_a_5xx(server, where, place, model):
    from ember.api import protocol

    schema = getattr(protocol, model)
    fields = sorted({f.alias or name for name, f in schema.model_fields.items()} | set(schema.not_yet))
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for field in fields:
            for value in FUZZ_VALUES:
                r = client.post("/v1/chat/completions", **_wire({**chat(max_tokens=1), **place({field: value})}))
                error = r.json().get("error") if r.status_code >= 400 and r.content else None
                param = (error or {}).get("param") or ""
                if r.status_code >= 500 or (error is not None and (set(error) != {"message", "type", "param", "code"}
                                                                    or not param.startswith(f"{where}.{field}"))):
                    failures.append((field, repr(value)[:40], r.status_code, r.text[:200]))
    assert not failures, "\n".join(map(str, failures))
    stats = server.wait_idle()
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0, stats
