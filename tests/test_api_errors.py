"""Client mistakes get a 4xx with `{"error": {message, type, param, code}}` naming the field; never a 500."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server import MODEL, TINY_BLOCK_SIZE, TINY_KV_BLOCKS

CHAT = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", **fields}


CHAT_ERRORS = [
    (chat(bogus=1), 400, "bogus", "unknown_field"),
    ({**chat(), "messages": [{"role": "user", "content": "x", "colour": "red"}]}, 400, "messages[0].colour",
     "unknown_field"),
    (chat(temperature="hot"), 400, "temperature", "invalid_value"),
    (chat(temperature=3), 400, "temperature", "invalid_value"),
    (chat(top_p=1.5), 400, "top_p", "invalid_value"),
    (chat(top_k=-1), 400, "top_k", "invalid_value"),
    (chat(n=0), 400, "n", "invalid_value"),
    (chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    (chat(max_tokens="5"), 400, "max_tokens", "invalid_value"),
    (chat(max_tokens=5, max_completion_tokens=5), 400, "max_completion_tokens", "invalid_value"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    (chat(stop=5), 400, "stop", "invalid_value"),
    (chat(stream="yes"), 400, "stream", "invalid_value"),
    (chat(context_length_exceeded_behavior="explode"), 400, "context_length_exceeded_behavior",
     "invalid_value"),
    (chat(messages=[]), 400, "messages", "invalid_value"),
    ({"model": MODEL}, 400, "messages", "missing_field"),
    ({"messages": CHAT}, 400, "model", "missing_field"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", "invalid_value"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content[0].type", "unsupported_parameter"),
    (chat(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter"),
    (chat(response_format={"type": "json_object"}), 400, "response_format", "unsupported_parameter"),
    (chat(model="no-such-model"), 404, "model", "model_not_found"),
    (chat(model="accounts/fireworks/models/no-such-model"), 404, "model", "model_not_found"),
    (chat(messages=[{"role": "user", "content": "hi " * 9000}]), 400, "messages", "context_length_exceeded"),
]

COMPLETION_ERRORS = [
    (completion(prompt=[[]]), 400, "prompt[0]", "invalid_value"),
    (completion(prompt=[]), 400, "prompt", "invalid_value"),
    (completion(prompt=[10**9]), 400, "prompt", "invalid_request_error"),
    (completion(prompt=[-1]), 400, "prompt[0]", "invalid_value"),
    (completion(prompt=""), 400, "prompt", "invalid_request_error"),
    (completion(prompt=None), 400, "prompt", "invalid_value"),
    (completion(echo=True), 400, "echo", "unsupported_parameter"),
    (completion(logprobs=0), 400, "logprobs", "unsupported_parameter"),
    (completion(seed=2**70), 400, "seed", "invalid_value"),
]


def _check(response: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)


@pytest.mark.parametrize("body,status,param,code", CHAT_ERRORS)
def test_chat_errors(server, body, status, param, code):
    _check(server.post("/v1/chat/completions", body), status, param, code)


@pytest.mark.parametrize("body,status,param,code", COMPLETION_ERRORS)
def test_completion_errors(server, body, status, param, code):
    _check(server.post("/v1/completions", body), status, param, code)


def test_streaming_requests_fail_before_the_stream_starts(server):
    _check(server.post("/v1/chat/completions", chat(stream=True, temperature=9)), 400, "temperature",
           "invalid_value")


def test_bad_bodies_routes_and_methods(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    _check(r, 400, None, "invalid_json")
    _check(server.post("/v1/chat/completions", [1, 2]), 400, None, "invalid_body")
    _check(httpx.post(f"{server.url}/v1/completions"), 400, None, "invalid_body")
    _check(httpx.get(f"{server.url}/v1/nothing-here"), 404, None, "not_found")
    _check(httpx.get(f"{server.url}/v1/chat/completions"), 405, None, "method_not_allowed")
    assert server.stats()["kv_blocks_used"] == 0


def test_sdk_raises_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={"bogus": 1})
    assert info.value.body["param"] == "bogus"


def test_context_window_errors(tiny_server):
    window = TINY_KV_BLOCKS * TINY_BLOCK_SIZE
    too_long = {"model": tiny_server.model, "prompt": [1] * window}
    _check(tiny_server.post("/v1/completions", too_long), 400, "prompt", "context_length_exceeded")
    over = {"model": tiny_server.model, "prompt": [1] * 10, "max_tokens": window,
            "context_length_exceeded_behavior": "error"}
    _check(tiny_server.post("/v1/completions", over), 400, "max_tokens", "context_length_exceeded")
    fits = {**over, "max_tokens": window - 10, "stream": False}
    assert tiny_server.post("/v1/completions", {**fits, "max_tokens": 1}).status_code == 200
    _check(tiny_server.post("/v1/completions", {**over, "model": MODEL}), 404, "model", "model_not_found")
