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
    (chat(top_k=101), 400, "top_k", "invalid_value"),
    (chat(n=0), 400, "n", "invalid_value"),
    (chat(n=129), 400, "n", "invalid_value"),
    (chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    (chat(max_tokens="5"), 400, "max_tokens", "invalid_value"),
    (chat(max_tokens=5, max_completion_tokens=5), 400, "max_completion_tokens", "invalid_value"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    # request limits (README): generous, but a request past them is a 400 naming the field
    (chat(messages=CHAT * 10_001), 400, "messages", "invalid_value"),
    (chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]), 400, "tools",
     "invalid_value"),
    (chat(functions=[{"name": f"f{i}"} for i in range(129)]), 400, "functions", "invalid_value"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
        "name": "f", "arguments": "{}"}} for i in range(129)]}, *CHAT]), 400, "messages[0].tool_calls",
     "invalid_value"),
    (chat(logit_bias={str(i): 1 for i in range(1025)}), 400, "logit_bias", "invalid_value"),
    (chat(n=128, max_tokens=8193), 400, "max_tokens", "invalid_value"),
    (chat(n=2, max_completion_tokens=2**20), 400, "max_completion_tokens", "invalid_value"),
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
    (chat(prediction={"type": "content", "content": 5}), 400, "prediction.content", "invalid_value"),
    (chat(prediction="x", speculation="x"), 400, "speculation", "invalid_value"),  # the same thing twice
    (chat(tools=[{"type": "function", "function": {"name": "no spaces"}}]), 400, "tools[0].function.name",
     "invalid_value"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]), 400,
     "tools[0].function.parameters", "invalid_grammar"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function",
                                                                          "function": {"name": "g"}}),
     400, "tool_choice", "invalid_value"),
    (chat(tool_choice="required"), 400, "tool_choice", "invalid_value"),  # no tools
    (chat(functions=[{"name": "f"}], function_call={"name": "g"}), 400, "function_call", "invalid_value"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], response_format={"type": "json_object"}),
     400, "response_format", "invalid_value"),
    (chat(response_format={"type": "xml"}), 400, "response_format.type", "invalid_value"),
    (chat(response_format={"type": "json_schema"}), 400, "response_format.json_schema", "invalid_value"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     400, "response_format.json_schema", "invalid_grammar"),
    (chat(response_format={"type": "json_object", "schema": "{not json"}), 400, "response_format.schema",
     "invalid_value"),
    (chat(reasoning_effort="high"), 400, "reasoning_effort", "unsupported_parameter"),
    (chat(reasoning_effort=True), 400, "reasoning_effort", "unsupported_parameter"),
    (chat(images=[]), 400, "images", "unknown_field"),  # completions only
    (chat(prompt_truncate_len=0), 400, "prompt_truncate_len", "invalid_value"),
    (chat(prompt_truncate_len=3), 400, "prompt_truncate_len", "invalid_request_error"),  # cannot fit
    (chat(model="no-such-model"), 404, "model", "model_not_found"),
    (chat(model="accounts/fireworks/models/no-such-model"), 404, "model", "model_not_found"),
    (chat(messages=[{"role": "user", "content": "hi " * 9000}]), 400, "messages", "context_length_exceeded"),
]

# every sampling and inspection field, outside the Fireworks schema's range (OpenAI's where it is silent)
FIELD_ERRORS = [
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"typical_p": 1.01}, "typical_p"),
    ({"typical_p": "high"}, "typical_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"), ({"frequency_penalty": 2.1}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"), ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"mirostat_target": 0}, "mirostat_target"),
    ({"mirostat_target": "5"}, "mirostat_target"), ({"mirostat_lr": 1.5}, "mirostat_lr"),
    ({"mirostat_lr": -0.1}, "mirostat_lr"), ({"logprobs": 6}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"), ({"echo": "yes"}, "echo"),
    ({"echo": 1}, "echo"), ({"echo_last": -1}, "echo_last"), ({"echo_last": True}, "echo_last"),
    ({"raw_output": 1}, "raw_output"), ({"return_token_ids": "true"}, "return_token_ids"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": -1, "echo": True}, "max_tokens"), ({"seed": 1.5}, "seed"), ({"ignore_eos": "no"}, "ignore_eos"),
    ({"service_tier": "gold"}, "service_tier"), ({"metadata": {"k": 1}}, "metadata.k"), ({"user": 5}, "user"),
]


@pytest.mark.parametrize("path,make", [("/v1/chat/completions", chat), ("/v1/completions", completion)])
@pytest.mark.parametrize("fields,param", FIELD_ERRORS)
def test_field_errors_name_the_field(server, path, make, fields, param):
    _check(server.post(path, make(**fields)), 400, param, "invalid_value")


COMPLETION_ERRORS = [
    (completion(prompt=[[]]), 400, "prompt[0]", "invalid_value"),
    (completion(prompt=[]), 400, "prompt", "invalid_value"),
    (completion(prompt=[10**9]), 400, "prompt", "invalid_request_error"),
    (completion(prompt=[-1]), 400, "prompt[0]", "invalid_value"),
    (completion(prompt=""), 400, "prompt", "invalid_request_error"),
    (completion(prompt=None), 400, "prompt", "invalid_value"),
    (completion(seed=2**70), 400, "seed", "invalid_value"),
    (completion(logit_bias={"49152": 1}), 400, "logit_bias", "invalid_request_error"),  # past the vocabulary
    (completion(prompt_truncate_len=10), 400, "prompt_truncate_len", "unknown_field"),  # chat only
    (completion(tools=[]), 400, "tools", "unknown_field"),
    (completion(images=["data:image/png;base64,AAAA"]), 400, "images", "unsupported_parameter"),
    (completion(response_format={"type": "grammar"}), 400, "response_format.grammar", "invalid_value"),
    (completion(response_format={"type": "grammar", "grammar": "root ::= ("}), 400, "response_format.grammar",
     "invalid_grammar"),
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
