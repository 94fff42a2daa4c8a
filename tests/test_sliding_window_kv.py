"""A sliding-window model's window layers keep only the KV blocks their window reads (ember.engine.block_manager's
layer groups), on a tiny random Gemma 3 (five window layers of 8 positions, one full layer; blocks of 4 tokens):
every output equals the one-table layout's (`--no-sliding-window-kv`) through chunked prefill, decoding far past the
window, drafts and their rollback, n > 1 forks, prefix-cache hits and preemption; and a long sequence holds its
full layer's blocks plus a bounded few per window group."""

from __future__ import annotations

import pytest
import torch

from ember.engine.block_manager import NULL_BLOCK
from ember.engine.request import SamplingParams
from tests.test_decoder_embeddings import _gemma3_hf, _gemma3_weights
from tests.tiny_model import greedy, make_engine, run_all

WINDOW, BLOCK = 8, 4


@pytest.fixture(scope="module")
def weights():
    return _gemma3_weights(_gemma3_hf())


def _engine(weights, grouped: bool, **config):
    config.setdefault("max_num_batched_tokens", 16)
    return make_engine(weights, sliding_window_kv=grouped, block_size=BLOCK, **config)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _requests() -> dict[str, tuple[list[int], SamplingParams]]:
    repeated = _prompt(9, 12) * 4  # prompt lookup drafts from it
    return {
        "short": (_prompt(1, 5), greedy(40)),
        "long": (_prompt(2, 45), greedy(40)),
        "chunked": (_prompt(3, 70), greedy(24)),
        "drafts": (repeated, greedy(48)),
        "forks": (_prompt(4, 23), SamplingParams(temperature=0.9, seed=7, n=3, max_tokens=30, ignore_eos=True)),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # the C kernel's path, the SDPA path
def test_outputs_equal_the_one_table_layout(weights, dtype):
    """SDPA in bfloat16 rounds by the batch's shape, and how many drafts a step verifies depends on the free blocks
    (which the layouts count differently): that path runs without prompt lookup, so both take the same steps."""
    speculation = "prompt-lookup" if dtype == "float32" else "off"
    grouped, single = (_engine(weights, g, dtype=dtype, speculation=speculation) for g in (True, False))
    assert grouped.block_manager.window_groups == 5 and single.block_manager.window_groups == 0
    assert grouped.runner.cpu_attention == (dtype == "float32")
    assert run_all(grouped, _requests()) == run_all(single, _requests())
    assert grouped.stats()["kv_blocks_used"] == 0  # every block back, the null block aside


def test_prefix_cache_hits_need_the_last_window_too(weights):
    engine = _engine(weights, True)
    prompt = _prompt(5, 30)
    first = run_all(engine, {"a": (prompt, greedy(6))})["a"]
    engine.add_request("b", prompt, greedy(6))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert [t for o in outs for t in o.token_ids] == first
    assert outs[-1].num_cached_tokens == 28  # 7 full blocks: the window groups' last ones were still cached
    # a prompt that shares the first 20 tokens: the hit stops where the window groups' blocks do
    other = {"c": (prompt[:20] + _prompt(6, 10), greedy(6))}
    assert run_all(engine, other) == run_all(_engine(weights, False), other)


def test_a_long_sequence_keeps_only_its_window_blocks(weights):
    engine = _engine(weights, True)
    bm = engine.block_manager
    engine.add_request("long", _prompt(8, 10), greedy(300))
    most = 0
    while engine.has_work():
        engine.step()
        if not engine.seqs.get("long"):
            continue
        seq = engine.seqs["long"][0]
        full = len(seq.block_table)
        live = [sum(b != NULL_BLOCK for b in table) for table in seq.window_tables]
        assert max(live) <= -(-(WINDOW - 1) // BLOCK) + 2, live  # the window behind the next query, its block
        most = max(most, bm.num_used_blocks - full)
    assert most <= 5 * (-(-(WINDOW - 1) // BLOCK) + 2)
    # 310 tokens: one-table blocks hold six layers each (78 of them); these hold one: 78 + 5 x 4 at most, a 4.5x cut
    assert bm.num_used_blocks == 0


def test_preemption_under_a_small_pool(weights):
    requests = {f"r{i}": (_prompt(20 + i, 20 + 3 * i), greedy(40)) for i in range(4)}
    small = _engine(weights, True, num_kv_blocks=60, max_num_seqs=4)
    assert small.block_manager.window_groups == 5
    out = run_all(small, requests)
    assert small.stats()["preemptions"] > 0
    assert out == run_all(_engine(weights, False), requests)
    assert small.stats()["kv_blocks_used"] == 0


def test_too_small_a_pool_falls_back_to_one_table(weights):
    """Blocks for the window groups' steps would leave no room for a sequence: the layout is the usual one."""
    engine = _engine(weights, True, num_kv_blocks=38)  # 1 null + 5 groups x 7 blocks for a step: 8 tokens left
    assert engine.block_manager.window_groups == 0 and engine.max_model_len == 152
