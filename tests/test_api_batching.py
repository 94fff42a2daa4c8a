"""What the engine does for HTTP clients: shared forward passes, prefix cache hits, aborts on
disconnect, preemption under a tiny KV budget, and no leaked KV blocks."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server import MODEL


def test_sixteen_concurrent_requests_share_forward_passes(server):
    before = server.stats()
    aclient = server.aclient()

    async def one(i: int):
        return await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=16,
            temperature=0.7, seed=i, extra_body={"ignore_eos": True})

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(main())
    assert all(r.usage.completion_tokens == 16 and r.choices[0].message.content for r in results)
    after = server.wait_idle()
    assert after["max_batch_seqs"] > 1
    assert after["steps"] - before["steps"] < 16 * 16 / 2  # one pass served many sequences
    assert after["kv_blocks_used"] == 0


def test_repeated_long_prompt_hits_the_prefix_cache(server):
    client = server.client()
    long = [{"role": "user", "content": "Summarise: " + " ".join(f"item {i} is red;" for i in range(40))}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=12, temperature=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=long, max_tokens=12,
                                                           temperature=0)
    second = raw.parse()
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 200 and cached >= first.usage.prompt_tokens - 16
    assert int(raw.headers["fireworks-cached-prompt-tokens"]) == cached
    assert second.choices[0].message.content == first.choices[0].message.content


@pytest.mark.parametrize("n", [1, 2])
def test_closing_a_stream_aborts_the_sequence(server, n):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=2000,
        stream=True, n=n, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 4 + n:
            break
    assert server.stats()["num_running"] == n
    stream.close()
    stats = server.wait_idle(timeout=5)
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0


def test_a_client_that_gives_up_aborts_a_non_streaming_request(server):
    before = server.stats()["generated_tokens"]
    with pytest.raises(httpx.TimeoutException):
        server.post("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000,
                                        "ignore_eos": True}, timeout=1.5)
    stats = server.wait_idle(timeout=5)
    assert stats["num_running"] == stats["kv_blocks_used"] == 0
    assert stats["generated_tokens"] - before < 1000  # stopped long before max_tokens


def test_tiny_kv_cache_preempts_and_answers_as_if_alone(tiny_server):
    prompts = [[{"role": "user", "content": f"Tell me fact number {i} about cats."}] for i in range(8)]
    kw = dict(model=tiny_server.model, max_tokens=16, temperature=0)
    client = tiny_server.client()
    alone = [client.chat.completions.create(messages=p, **kw).choices[0].message.content for p in prompts]
    aclient = tiny_server.aclient()
    before = tiny_server.stats()

    async def main():
        return await asyncio.gather(*(aclient.chat.completions.create(messages=p, **kw) for p in prompts))

    together = [r.choices[0].message.content for r in asyncio.run(main())]
    stats = tiny_server.wait_idle()
    assert together == alone
    assert stats["kv_blocks_used"] == 0 and stats["max_batch_seqs"] > 1
    # 8 x ~55 tokens cannot fit 192 tokens of cache at once: the scheduler had to preempt
    assert stats["preemptions"] > before["preemptions"]
