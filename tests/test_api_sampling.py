"""Sampling parameters through HTTP: each reaches the engine (filters that reduce to greedy must give
the greedy text), n samples share one prefill, seeds hold inside mixed batches, the sampling-options
header, prompt_truncate_len, and the harmless schema fields accepted."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server import MODEL, TINY_GENERATION_CONFIG

CHAT = [{"role": "user", "content": "Tell me something about volcanoes."}]
PROMPT = "Once upon a time, in a small village by the sea,"


def _completion(server, **fields) -> dict:
    r = server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_options_header_reports_every_value_used(server):
    raw = server.client().completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0.8, top_p=0.9, frequency_penalty=0.5,
        presence_penalty=-0.25, seed=7, n=2, logit_bias={"33": 2.5},
        extra_body={"top_k": 40, "min_p": 0.05, "typical_p": 0.95, "repetition_penalty": 1.1,
                    "mirostat_target": 3.0})
    assert json.loads(raw.headers["fireworks-sampling-options"]) == {
        "temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "typical_p": 0.95, "repetition_penalty": 1.1,
        "frequency_penalty": 0.5, "presence_penalty": -0.25, "mirostat_target": 3.0, "mirostat_lr": 0.1,
        "seed": 7, "max_tokens": 2, "logit_bias": {"33": 2.5}, "n": 2}
    assert len(raw.parse().choices) == 2


def test_generation_config_defaults_and_request_overrides(tiny_server):
    raw = tiny_server.client().chat.completions.with_raw_response.create(
        model=tiny_server.model, messages=CHAT, max_tokens=1, extra_body={"typical_p": 0.9})
    assert json.loads(raw.headers["fireworks-sampling-options"]) == {
        "top_p": 1.0, **TINY_GENERATION_CONFIG, "typical_p": 0.9, "max_tokens": 1}


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"min_p": 1.0}, {"mirostat_target": 0.01}])
def test_filters_that_leave_one_token_give_the_greedy_text(server, filters):
    """Mirostat with a target near 0 bits keeps only the likeliest token, as do top_k 1 and min_p 1: at
    temperature 1 these reproduce greedy decoding only if the field reached the sampler."""
    greedy = _completion(server, temperature=0, ignore_eos=True)["choices"][0]["text"]
    assert _completion(server, temperature=1, seed=3, ignore_eos=True)["choices"][0]["text"] != greedy
    assert _completion(server, temperature=1, seed=3, ignore_eos=True, **filters)["choices"][0]["text"] == greedy


def test_logit_bias_forces_and_forbids_tokens(server, tokenizer):
    forced = _completion(server, temperature=1, seed=1, max_tokens=4, logit_bias={"33": 100}, ignore_eos=True)
    assert forced["choices"][0]["text"] == tokenizer.decode([33] * 4)
    greedy = _completion(server, temperature=0, max_tokens=4, return_token_ids=True)["choices"][0]["token_ids"]
    banned = _completion(server, temperature=0, max_tokens=4, return_token_ids=True,
                         logit_bias={str(greedy[0]): -100})["choices"][0]["token_ids"]
    assert banned[0] != greedy[0]


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.5}, {"frequency_penalty": 2.0},
                                     {"presence_penalty": 2.0}])
def test_penalties_change_a_repetitive_greedy_text(server, penalty):
    kw = dict(prompt="a b a b a b a b a b a b", max_tokens=12, temperature=0, ignore_eos=True)
    plain = _completion(server, **kw)["choices"][0]["text"]
    assert _completion(server, **kw, **penalty)["choices"][0]["text"] != plain


def test_n_samples_share_one_prefill(server):
    before = server.wait_idle()
    resp = _completion(server, prompt="Write one sentence about the moon:", n=8, max_tokens=6, temperature=1,
                       seed=3, ignore_eos=True)
    after = server.wait_idle()
    assert [c["index"] for c in resp["choices"]] == list(range(8))
    assert all(c["finish_reason"] == "length" for c in resp["choices"])
    assert len({c["text"] for c in resp["choices"]}) >= 6  # one seed, yet each sample its own draws
    usage = resp["usage"]
    assert usage["completion_tokens"] == 48
    computed = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert after["prompt_tokens"] - before["prompt_tokens"] == computed > 0  # one prefill, not 8
    assert after["kv_blocks_used"] == 0


def test_streamed_n_samples_keep_their_index_and_finish(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "n": 3, "temperature": 1, "seed": 4,
            "ignore_eos": True}
    chunks = server.stream("/v1/chat/completions", body)
    assert all(len(c["choices"]) == 1 for c in chunks)
    reasons = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
               if c["choices"][0]["finish_reason"]}
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert [c.get("usage") is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["usage"]["completion_tokens"] == 15
    whole = server.post("/v1/chat/completions", body).json()
    texts = {c["index"]: c["message"]["content"] for c in whole["choices"]}
    streamed = {i: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                           if c["choices"][0]["index"] == i) for i in range(3)}
    assert streamed == texts and len(set(texts.values())) == 3


def test_a_seeded_request_samples_the_same_alone_and_in_a_mixed_batch(server):
    probe = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1, "top_p": 0.9, "seed": 77, "ignore_eos": True}
    neighbours = [{"temperature": 0}, {"top_k": 5}, {"min_p": 0.2}, {"typical_p": 0.5}, {"mirostat_target": 3.0},
                  {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.5},
                  {"logit_bias": {"33": 5}}, {"n": 3, "seed": 1}, {"logprobs": 2}, {"echo": True, "logprobs": 1}]
    alone = _completion(server, **probe)["choices"][0]["text"]

    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            bodies = [probe, *({"prompt": f"Story {i}:", "max_tokens": 16, "temperature": 1, "ignore_eos": True,
                                **n} for i, n in enumerate(neighbours)), probe]
            replies = await asyncio.gather(*(client.post("/v1/completions", json={"model": MODEL, **b})
                                             for b in bodies))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return [r.json() for r in replies]

    replies = asyncio.run(main())
    assert replies[0]["choices"][0]["text"] == replies[-1]["choices"][0]["text"] == alone
    assert server.wait_idle()["max_batch_seqs"] > 1


def test_prompt_truncate_len_drops_the_oldest_messages(server):
    system = {"role": "system", "content": "Answer in one word."}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: " + "blah " * 20}
             for i in range(4)] + [{"role": "user", "content": "What colour is the sky?"}]
    client = server.client()
    kw = dict(model=MODEL, max_tokens=6, temperature=0)
    full = client.chat.completions.create(messages=[system, *turns], **kw)
    shorter = client.chat.completions.create(messages=[system, *turns[2:]], **kw)
    cut = client.chat.completions.create(messages=[system, *turns], **kw,
                                         extra_body={"prompt_truncate_len": shorter.usage.prompt_tokens})
    assert cut.usage.prompt_tokens == shorter.usage.prompt_tokens < full.usage.prompt_tokens
    assert cut.choices[0].message.content == shorter.choices[0].message.content
    roomy = client.chat.completions.create(messages=[system, *turns], **kw,
                                           extra_body={"prompt_truncate_len": full.usage.prompt_tokens})
    assert roomy.usage.prompt_tokens == full.usage.prompt_tokens


@pytest.mark.parametrize("path,fields", [
    ("/v1/chat/completions", {"user": "u1", "metadata": {"team": "a"}, "service_tier": "priority",
                              "prompt_cache_key": "k", "prompt_cache_isolation_key": "iso",
                              "perf_metrics_in_response": False, "reasoning_effort": "none", "tool_choice": "none",
                              "response_format": {"type": "text"}, "thinking": {"type": "disabled"},
                              "safe_tokenization": False, "parallel_tool_calls": False, "logprobs": False,
                              "echo": False, "echo_last": 0, "raw_output": False, "return_token_ids": False}),
    ("/v1/completions", {"user": "u1", "metadata": {"team": "a"}, "service_tier": "flex",
                         "prompt_cache_key": "k", "reasoning_effort": False, "images": [], "stream": False,
                         "context_length_exceeded_behavior": "error", "top_logprobs": 0}),
])
def test_harmless_schema_fields_are_accepted(server, path, fields):
    prompt = {"messages": CHAT} if "chat" in path else {"prompt": PROMPT}
    r = server.post(path, {"model": MODEL, **prompt, "max_tokens": 2, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None and "token_ids" not in choice and "raw_output" not in choice
