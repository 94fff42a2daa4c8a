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


def test_one_stream_carries_all_n_samples_and_ends_after_each_finished_or_aborted(weights):
    engine = AsyncEngine(make_engine(weights))
    engine.start()

    async def main():
        counts, reasons = {}, {}
        params = greedy(120, n=3)  # long enough that the abort lands before sample 1 could finish by itself
        async for out in engine.generate("r", _prompts(1)[0], params):
            counts[out.index] = counts.get(out.index, 0) + len(out.token_ids)
            if out.index == 1 and counts[1] == 2:
                engine.abort("r", 1)
            if out.finished:
                reasons[out.index] = out.finish_reason
        return counts, reasons

    try:
        counts, reasons = asyncio.run(main())
        assert reasons == {0: "length", 1: "abort", 2: "length"}
        assert counts[0] == counts[2] == 120 and 2 <= counts[1] < 120
        assert engine.stats()["kv_blocks_used"] == 0
    finally:
        engine.shutdown()
