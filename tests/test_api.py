"""The HTTP API through the official SDKs against a real server process."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from fireworks import Fireworks

from ember.models.loader import default_model_path
from ember.models.tokenizer import Tokenizer
from tests.server import MODEL, ember_server, engine_stats, wait_until_idle

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def base():
    with ember_server() as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused")


def test_models_and_health(base, client):
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_non_streaming_shape_and_headers(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0
    for header in ("fireworks-prompt-tokens", "fireworks-cached-prompt-tokens", "fireworks-server-time-to-first-token",
                   "fireworks-server-processing-time", "x-request-id", "fireworks-sampling-options"):
        assert header in raw.headers, header
    assert int(raw.headers["fireworks-prompt-tokens"]) == u.prompt_tokens
    assert json.loads(raw.headers["fireworks-sampling-options"])["temperature"] == 0


def test_fireworks_model_id_and_inference_prefix(base):
    resp = httpx.post(f"{base}/inference/v1/chat/completions", json={
        "model": f"accounts/fireworks/models/{MODEL}", "messages": CHAT, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == f"accounts/fireworks/models/{MODEL}"


def test_fireworks_sdk(base):
    fw = Fireworks(api_key="unused", base_url=base)
    resp = fw.chat.completions.create(model=f"accounts/fireworks/models/{MODEL}", messages=CHAT, max_tokens=8,
                                      temperature=0)
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens <= 8


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_equals_non_stream_at_temperature_zero(client, endpoint):
    if endpoint == "chat":
        kw = dict(model=MODEL, messages=CHAT, max_tokens=40, temperature=0)
        full = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        text, reason = full.choices[0].message.content, full.choices[0].finish_reason
    else:
        kw = dict(model=MODEL, prompt="The three primary colours are", max_tokens=40, temperature=0)
        full = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        text, reason = full.choices[0].text, full.choices[0].finish_reason
    assert streamed == text and text
    assert len({c.id for c in chunks}) == 1
    last = chunks[-1]
    assert last.choices[0].finish_reason == reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert last.usage is not None and last.usage.completion_tokens == full.usage.completion_tokens


def test_include_usage_adds_a_final_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_sixteen_concurrent_requests_share_forward_passes(base):
    before = engine_stats(base)
    aclient = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")

    async def one(i: int):
        return await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=16,
            extra_body={"ignore_eos": True})

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(main())
    assert all(r.usage.completion_tokens == 16 for r in results)
    after = wait_until_idle(base)
    steps = after["steps"] - before["steps"]
    seqs = after["scheduled_seqs"] - before["scheduled_seqs"]
    assert after["max_batch_seqs"] > 1
    assert seqs / steps > 4, (seqs, steps)  # 16 x (prefill + 16 decodes) ran in far fewer passes
    assert after["kv_blocks_used"] == 0


def test_prefix_cache_hit_on_repeated_long_prompt(client):
    long = [{"role": "user", "content": "Summarise: " + " ".join(f"item {i} is red;" for i in range(60))}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=16, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=long, max_tokens=16, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    assert second.choices[0].message.content == first.choices[0].message.content


def test_client_closing_a_stream_frees_its_blocks(base, client):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2000, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert engine_stats(base)["kv_blocks_used"] > 0 or True  # may already be aborted
    stream.close()
    stats = wait_until_idle(base, timeout=5)
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0


def test_stop_strings_keep_the_stop_word(client):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4, 5, 6,", max_tokens=30, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    assert " 8," in free, free  # the model counts on
    stopped = client.completions.create(**kw, stop=[" 8"])
    text = stopped.choices[0].text
    assert text == free[:free.index(" 8") + 2] and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=" 8", stream=True))
    assert streamed == text


def test_completions_prompt_forms_and_n(client):
    r = client.completions.create(model=MODEL, prompt=["Hello", "The sky is"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    single = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0)
    assert r.choices[1].text == single.choices[0].text
    token_ids = Tokenizer.load(default_model_path()).encode("The sky is")
    ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == len(token_ids) and ids.choices[0].text == single.choices[0].text
    lists = client.completions.create(model=MODEL, prompt=[token_ids, token_ids[:1]], max_tokens=2, temperature=0)
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == len(token_ids) + 1
    n2 = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, temperature=1, seed=5,
                                        extra_body={"ignore_eos": True})
    assert sorted(c.index for c in n2.choices) == [0, 1]
    assert n2.usage.completion_tokens == 16  # both choices counted
    assert n2.choices[0].message.content != n2.choices[1].message.content


def test_max_tokens_lowered_to_fit_context(base):
    long_prompt = "word " * 8000  # ~8000 tokens of an 8192 context
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": long_prompt, "max_tokens": 1000,
                                                   "ignore_eos": True, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 8192
    assert body["choices"][0]["finish_reason"] == "length"


ERRORS = [
    ({"model": MODEL, "messages": CHAT, "bogus": 1}, 400, "bogus"),
    ({"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": CHAT, "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "messages": CHAT, "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 5, "max_completion_tokens": 5}, 400, None),
    ({"model": MODEL, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": CHAT, "logprobs": True}, 400, "logprobs"),
    ({"model": "no-such-model", "messages": CHAT}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "messages"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 9000, "context_length_exceeded_behavior": "error"}, 400,
     "max_tokens"),
]


@pytest.mark.parametrize("body,status,param", ERRORS)
def test_chat_errors(base, body, status, param):
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "prompt": [[]]}, "prompt"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt"),
    ({"model": MODEL, "prompt": [-1]}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
])
def test_completion_errors(base, body, param):
    r = httpx.post(f"{base}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_bad_json_and_unknown_route(base):
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{base}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert engine_stats(base)["kv_blocks_used"] == 0


def test_tiny_kv_cache_preempts_and_still_answers_correctly():
    prompts = [[{"role": "user", "content": f"Tell me fact number {i} about cats."}] for i in range(8)]
    kw = dict(model=MODEL, max_tokens=24, temperature=0)
    with ember_server("--num-kv-blocks", "12", "--block-size", "16") as url:
        sync = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        alone = [sync.chat.completions.create(messages=p, **kw).choices[0].message.content for p in prompts]
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")

        async def main():
            return await asyncio.gather(*(aclient.chat.completions.create(messages=p, **kw) for p in prompts))

        together = [r.choices[0].message.content for r in asyncio.run(main())]
        stats = wait_until_idle(url)
    assert together == alone
    assert stats["preemptions"] > 0 and stats["kv_blocks_used"] == 0
