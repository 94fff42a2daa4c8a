"""Engine behaviour on a tiny random-weight model: numerics, batching, caching, preemption, aborts."""

from __future__ import annotations

import random

import pytest
import torch

from ember.engine.request import SamplingParams
from tests.tiny_model import VOCAB, greedy, make_engine, make_hf_model, run_all, weights_of


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def hf():
    return make_hf_model()


@pytest.fixture(scope="module")
def weights(hf):
    return weights_of(hf)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
])
def test_logits_match_transformers(arch, overrides):
    model = make_hf_model(arch, **overrides)
    engine = make_engine(weights_of(model))
    prompt = _prompt(random.Random(1), 37)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    engine.add_request("a", prompt, greedy(1))
    batch = engine.scheduler.schedule()
    ours = engine.runner.run(batch)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    engine.abort("a")
    assert run_all(engine, {"b": (prompt, greedy(12))})["b"] == _hf_greedy(model, prompt, 12)


def test_batch_invariance_with_chunked_prefill(weights):
    """Greedy tokens are the same alone and in a batch of 8 prompts of different lengths, where
    long prompts are prefilled in chunks while the others decode."""
    rng = random.Random(2)
    requests = {f"r{i}": (_prompt(rng, 5 + 23 * i), greedy(24)) for i in range(8)}
    alone = {rid: run_all(make_engine(weights), {rid: req})[rid] for rid, req in requests.items()}
    engine = make_engine(weights, max_num_batched_tokens=32)
    together = run_all(engine, requests)
    assert together == alone
    stats = engine.stats()
    assert stats["max_batch_seqs"] == 8
    assert stats["scheduled_seqs"] > stats["steps"]
    assert stats["kv_blocks_used"] == 0


def test_prefix_cache_hit_reports_cached_tokens_and_same_output(weights):
    engine = make_engine(weights, block_size=4)
    prompt = _prompt(random.Random(3), 30)
    first = run_all(engine, {"a": (prompt, greedy(8))})["a"]
    engine.add_request("b", prompt, greedy(8))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [t for o in outs for t in o.token_ids] == first
    assert outs[-1].num_cached_tokens == 28  # 7 full blocks; the last token is always recomputed
    assert engine.stats()["cached_tokens"] == 28


def _cached_tokens(engine, rid: str, prompt: list[int], params) -> tuple[int, list[int]]:
    """(prompt tokens served from the cache, generated tokens) of one request run alone."""
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs[-1].num_cached_tokens, [t for o in outs for t in o.token_ids]


def test_isolation_keys_never_share_blocks(weights):
    engine = make_engine(weights, block_size=4)
    prompt = _prompt(random.Random(11), 30)
    cold, first = _cached_tokens(engine, "a", prompt, greedy(6, cache_salt="tenant-a"))
    other, second = _cached_tokens(engine, "b", prompt, greedy(6, cache_salt="tenant-b"))
    default, third = _cached_tokens(engine, "c", prompt, greedy(6))
    same, fourth = _cached_tokens(engine, "d", prompt, greedy(6, cache_salt="tenant-a"))
    assert (cold, other, default, same) == (0, 0, 0, 28)
    assert first == second == third == fourth


def test_prompt_cache_max_len_bounds_reads_and_writes(weights):
    engine = make_engine(weights, block_size=4)
    prompt = _prompt(random.Random(12), 30)
    assert _cached_tokens(engine, "a", prompt, greedy(2, prompt_cache_max_len=0))[0] == 0
    assert _cached_tokens(engine, "b", prompt, greedy(2))[0] == 0  # "a" stored nothing
    assert _cached_tokens(engine, "c", prompt, greedy(2, prompt_cache_max_len=0))[0] == 0  # reads nothing
    assert _cached_tokens(engine, "d", prompt, greedy(2, prompt_cache_max_len=10))[0] == 8  # 2 whole blocks
    fresh = _prompt(random.Random(13), 30)
    _cached_tokens(engine, "e", fresh, greedy(2, prompt_cache_max_len=10))  # stores its first 2 blocks only
    assert _cached_tokens(engine, "f", fresh, greedy(2))[0] == 8


def test_block_digests_are_a_salted_sha256_chain(weights):
    """Block keys are SHA-256 over the parent digest and the block's tokens: no crafted prompt can make two
    different prefixes (or namespaces) meet, as Python's hash() of int tuples allowed."""
    import hashlib
    from array import array

    engine = make_engine(weights, block_size=4)
    prompt = _prompt(random.Random(14), 13)
    engine.add_request("a", prompt, greedy(4, cache_salt="k"))
    engine.step()
    seq = engine.seqs["a"][0]
    parent = hashlib.sha256(b"ember-kv\0k").digest()
    expected = []
    for i in range(3):
        parent = hashlib.sha256(parent + array("i", prompt[4 * i:4 * i + 4]).tobytes()).digest()
        expected.append(parent)
    assert seq.block_hashes[:3] == expected
    assert all(engine.block_manager.cached[d] == b for d, b in zip(expected, seq.block_table[:3], strict=True))
    run_all(engine, {})


def test_prefix_cache_shares_blocks_between_running_sequences(weights):
    engine = make_engine(weights, block_size=4)
    prompt = _prompt(random.Random(4), 17)
    run_all(engine, {"warm": (prompt, greedy(1))})
    engine.add_request("x", prompt + [5, 6], greedy(4))
    engine.add_request("y", prompt + [7, 8], greedy(4))
    engine.step()
    x, y = engine.seqs["x"][0], engine.seqs["y"][0]
    assert x.block_table[:4] == y.block_table[:4]
    assert all(engine.block_manager.ref_counts[b] == 2 for b in x.block_table[:4])
    run_all(engine, {})
    assert engine.stats()["kv_blocks_used"] == 0


def test_preemption_with_tiny_kv_cache(weights):
    rng = random.Random(5)
    requests = {f"r{i}": (_prompt(rng, 10 + 3 * i), greedy(20)) for i in range(8)}
    alone = {rid: run_all(make_engine(weights), {rid: req})[rid] for rid, req in requests.items()}
    engine = make_engine(weights, num_kv_blocks=24, block_size=4)
    assert run_all(engine, requests) == alone
    stats = engine.stats()
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_used"] == 0


def test_abort_frees_blocks_immediately(weights):
    engine = make_engine(weights)
    engine.add_request("a", _prompt(random.Random(6), 40), greedy(100))
    for _ in range(5):
        engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    engine.abort("a")
    assert engine.stats()["kv_blocks_used"] == 0
    assert not engine.has_work()


def test_lru_eviction_reuses_cached_blocks(weights):
    engine = make_engine(weights, num_kv_blocks=16, block_size=4)
    rng = random.Random(7)
    for i in range(6):  # each needs ~6 blocks: old cached blocks must be evicted to make room
        run_all(engine, {f"r{i}": (_prompt(rng, 20), greedy(4))})
    bm = engine.block_manager
    assert bm.num_used_blocks == 0
    assert len(bm.cached) <= bm.num_blocks
    assert all(bm.block_keys[b] == digest for digest, b in bm.cached.items())


def test_stop_conditions(weights):
    engine = make_engine(weights)
    prompt = _prompt(random.Random(8), 12)
    free_run = run_all(engine, {"a": (prompt, greedy(10))})["a"]
    stop_at = free_run[4]
    engine.add_request("b", prompt, greedy(10, stop_token_ids=[stop_at]))
    outs = []
    while engine.has_work():
        outs += engine.step()
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == free_run[:free_run.index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"
    engine.add_request("c", prompt, greedy(3))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert len(outs) == 3 and outs[-1].finished and outs[-1].finish_reason == "length"


def test_max_model_len_caps_generation(weights):
    engine = make_engine(weights, num_kv_blocks=8, block_size=4)  # 32 tokens of context
    assert engine.max_model_len == 32
    out = run_all(engine, {"a": (_prompt(random.Random(9), 28), greedy(100))})["a"]
    assert len(out) == 4
    with pytest.raises(ValueError, match="context"):
        engine.add_request("b", _prompt(random.Random(9), 32), greedy(1))


def test_seeded_sampling_is_batch_invariant(weights):
    rng = random.Random(10)
    prompt = _prompt(rng, 16)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = run_all(make_engine(weights), {"s": (prompt, seeded)})["s"]
    again = run_all(make_engine(weights), {"s": (prompt, seeded)})["s"]
    others = {f"o{i}": (_prompt(rng, 8 + i), SamplingParams(temperature=0.7, max_tokens=20))
              for i in range(5)}
    mixed = run_all(make_engine(weights), {"s": (prompt, seeded), **others})["s"]
    assert alone == again == mixed
    other_seed = run_all(make_engine(weights), {"s": (prompt, SamplingParams(
        temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))})["s"]
    assert other_seed != alone


def test_timings_and_step_phases(weights):
    """Each sample's phases come back in order on its outputs, and every step reports where its time went."""
    engine = make_engine(weights)
    steps = []
    engine.on_step = steps.append
    engine.add_request("a", _prompt(random.Random(15), 20), greedy(5, n=2))
    outs = []
    while engine.has_work():
        outs += engine.step()
    for final in [o for o in outs if o.finished]:
        t = final.timings
        assert t.arrival <= t.scheduled <= t.first_token <= t.finished
    assert {o.index for o in outs if o.finished} == {0, 1}
    assert len(steps) == engine.stats()["steps"] and steps[-1] is engine.last_step
    for phases in steps:
        assert min(phases.schedule, phases.prepare, phases.forward, phases.sample, phases.postprocess) >= 0
        assert phases.forward > 0 and phases.batch >= 1
