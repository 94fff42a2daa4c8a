"""The threaded AsyncEngine: concurrent streams share steps, closing a stream frees its blocks."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from ember.engine.engine import AsyncEngine
from tests.tiny_model import VOCAB, greedy, make_engine, make_hf_model, run_all, weights_of


@pytest.fixture(scope="module")
def weights():
    return weights_of(make_hf_model())


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(6 + 5 * i)] for i in range(n)]


def test_concurrent_generate_matches_sync_engine(weights):
    prompts = _prompts(6)
    expected = run_all(make_engine(weights), {str(i): (p, greedy(12)) for i, p in enumerate(prompts)})
    engine = AsyncEngine(make_engine(weights))
    engine.start()

    async def one(i: int) -> list[int]:
        tokens = []
        async for out in engine.generate(str(i), prompts[i], greedy(12)):
            tokens += out.token_ids
        assert out.finished and out.finish_reason == "length"
        return tokens

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    try:
        results = asyncio.run(main())
        assert {str(i): r for i, r in enumerate(results)} == expected
        stats = engine.stats()
        assert stats["scheduled_seqs"] > stats["steps"]
        assert stats["kv_blocks_used"] == 0
    finally:
        engine.shutdown()


def test_closing_a_stream_aborts_and_frees_blocks(weights):
    engine = AsyncEngine(make_engine(weights))
    engine.start()

    async def main():
        stream = engine.generate("a", _prompts(1)[0], greedy(10_000))
        async for out in stream:
            if out.token_ids and engine.stats()["kv_blocks_used"] > 0:
                break
        await stream.aclose()

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 5
        while engine.stats()["kv_blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["kv_blocks_used"] == 0
        assert engine.stats()["num_running"] == 0
    finally:
        engine.shutdown()


def test_invalid_request_raises_value_error(weights):
    engine = AsyncEngine(make_engine(weights))
    engine.start()

    async def main():
        async for _ in engine.generate("x", [VOCAB + 5], greedy(1)):
            pass

    try:
        with pytest.raises(ValueError, match="token ids"):
            asyncio.run(main())
    finally:
        engine.shutdown()
