"""Per-request sampling inside the engine: n samples from one prefill, logprobs of prompt and output
against transformers, penalties and bias over the right tokens, seeds and Mirostat in mixed batches."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams, StepOutput
from tests.tiny_model import VOCAB, greedy, make_engine, make_hf_model, weights_of


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(seed=3)


@pytest.fixture(scope="module")
def weights(hf):
    return weights_of(hf)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _drain(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
           ) -> dict[tuple[str, int], list[StepOutput]]:
    """Every output of every sample, keyed by (request id, sample index)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[tuple[str, int], list[StepOutput]] = {}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for o in engine.step():
            outs.setdefault((o.request_id, o.index), []).append(o)
    assert not engine.has_work()
    assert engine.stats()["kv_blocks_used"] == 0
    return outs


def _tokens(outs: list[StepOutput]) -> list[int]:
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return [t for o in outs for t in o.token_ids]


def _hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at every position of `tokens`."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].log_softmax(-1)


SEEDED = SamplingParams(temperature=1.0, top_k=80, seed=42, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("prompt_len", [37, 40])  # the prompt's last block partly filled, and full
def test_n_samples_share_one_prefill_and_equal_separate_seeded_requests(weights, prompt_len):
    prompt = _prompt(1, prompt_len)
    engine = make_engine(weights)
    outs = _drain(engine, {"r": (prompt, replace(SEEDED, n=6))})
    assert sorted(outs) == [("r", i) for i in range(6)]
    assert engine.counters.prompt_tokens == prompt_len  # one prefill for all six
    samples = [_tokens(outs["r", i]) for i in range(6)]
    assert len({tuple(s) for s in samples}) == 6
    for i, sample in enumerate(samples):  # sample i is the request with seed + i: forking lost nothing
        alone = _drain(make_engine(weights), {"a": (prompt, replace(SEEDED, seed=SEEDED.seed + i))})
        assert sample == _tokens(alone["a", 0])


def test_n_samples_survive_a_cache_too_small_to_fork_into(weights):
    prompt = _prompt(2, 30)
    expected = _drain(make_engine(weights), {"r": (prompt, replace(SEEDED, n=5))})
    engine = make_engine(weights, num_kv_blocks=14, block_size=4, max_num_seqs=3)
    got = _drain(engine, {"r": (prompt, replace(SEEDED, n=5))})
    assert {k: _tokens(v) for k, v in got.items()} == {k: _tokens(v) for k, v in expected.items()}


def test_greedy_n_gives_n_copies(weights):
    prompt = _prompt(3, 21)
    outs = _drain(make_engine(weights), {"r": (prompt, greedy(8, n=3))})
    assert len({tuple(_tokens(outs["r", i])) for i in range(3)}) == 1


def test_aborting_one_sample_leaves_the_others(weights):
    prompt = _prompt(4, 18)
    engine = make_engine(weights)
    engine.add_request("r", prompt, replace(SEEDED, n=3, max_tokens=10))
    engine.step()
    assert [o.finish_reason for o in engine.abort("r", 1)] == ["abort"]
    rest = _drain(engine, {})
    assert sorted(rest) == [("r", 0), ("r", 2)]
    assert all(len(_tokens(rest[k])) == 9 for k in rest)  # the first token came from the step above


def test_abort_before_the_fork_ends_every_sample(weights):
    engine = make_engine(weights)
    engine.add_request("r", _prompt(5, 18), replace(SEEDED, n=4))
    outs = engine.abort("r")
    assert sorted(o.index for o in outs) == [0, 1, 2, 3] and all(o.finish_reason == "abort" for o in outs)
    assert not engine.has_work()


def test_output_logprobs_equal_transformers(weights, hf):
    prompt = _prompt(6, 15)
    params = greedy(10, logprobs=5)
    outs = _drain(make_engine(weights), {"r": (prompt, params)})["r", 0]
    tokens = [t for o in outs for t in o.token_ids]
    ref = _hf_logprobs(hf, prompt + tokens)
    logprobs = [lp for o in outs for lp in o.logprobs]  # a step may emit several tokens (accepted drafts)
    assert len(logprobs) == len(tokens)
    for step, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        row = ref[len(prompt) - 1 + step]
        assert lp.token_id == token == int(row.argmax())
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        values, ids = row.topk(5)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_transformers_through_chunks_and_a_warm_cache(weights, hf):
    prompt = _prompt(7, 45)
    engine = make_engine(weights, max_num_batched_tokens=16)  # the prompt is computed in chunks
    _drain(engine, {"warm": (prompt, greedy(1))})  # its blocks are now cached; scoring must not use them
    outs = _drain(engine, {"r": (prompt, greedy(0, prompt_logprobs=2, n=2))})
    assert sorted(outs) == [("r", 0), ("r", 1)]
    ref = _hf_logprobs(hf, prompt)
    for index in (0, 1):
        (out,) = outs["r", index]
        assert out.finished and out.finish_reason == "length" and out.token_ids == []
        scored = out.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        for pos in range(1, len(prompt)):
            assert scored[pos].token_id == prompt[pos]
            assert scored[pos].logprob == pytest.approx(float(ref[pos - 1, prompt[pos]]), abs=1e-4)
            assert [t for t, _ in scored[pos].top] == ref[pos - 1].topk(2).indices.tolist()


def test_prompt_logprobs_come_with_the_first_token_of_each_sample(weights):
    outs = _drain(make_engine(weights), {"r": (_prompt(8, 20), replace(SEEDED, n=2, prompt_logprobs=0))})
    for index in (0, 1):
        first, *rest = outs["r", index]
        assert len(first.prompt_logprobs) == 20 and all(not lp.top for lp in first.prompt_logprobs[1:])
        assert all(o.prompt_logprobs is None for o in rest)


def test_penalties_and_bias_act_on_the_right_tokens(weights):
    prompt = _prompt(9, 16)
    presence = _tokens(_drain(make_engine(weights), {"r": (prompt, greedy(30, presence_penalty=1e4))})["r", 0])
    assert len(set(presence)) == len(presence)  # every output token is penalised once it appears
    repetition = _tokens(_drain(make_engine(weights), {"r": (prompt, greedy(30, repetition_penalty=1e4))})["r", 0])
    assert not set(repetition) & set(prompt) and len(set(repetition)) == len(repetition)  # prompt tokens too
    plain = _tokens(_drain(make_engine(weights), {"r": (prompt, greedy(30))})["r", 0])
    assert len(set(plain)) < len(plain) or set(plain) & set(prompt)  # the penalties above changed something
    forced = _tokens(_drain(make_engine(weights), {"r": (prompt, greedy(5, logit_bias={77: 100.0}))})["r", 0])
    assert forced == [77] * 5


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, top_k=40, seed=1),
    SamplingParams(temperature=0.7, min_p=0.1, seed=2),
    SamplingParams(temperature=1.0, typical_p=0.8, seed=3),
    SamplingParams(temperature=1.0, mirostat_target=3.0, mirostat_lr=0.2, seed=4),
    SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.3, frequency_penalty=0.5,
                   presence_penalty=0.4, seed=5),
    SamplingParams(temperature=0.7, logit_bias={11: 3.0, 12: -100.0}, logprobs=3, seed=6),
    SamplingParams(temperature=1.0, n=3, seed=7, min_p=0.05),
]


def test_every_request_of_a_mixed_batch_gets_what_it_gets_alone(weights):
    requests = {f"m{i}": (_prompt(10 + i, 9 + 4 * i), replace(p, max_tokens=14, ignore_eos=True))
                for i, p in enumerate(MIXED)}
    together = _drain(make_engine(weights), requests)
    assert len(together) == len(MIXED) + 2
    for rid, request in requests.items():
        alone = _drain(make_engine(weights), {rid: request})
        for key, outs in alone.items():
            assert _tokens(together[key]) == _tokens(outs), key
            ours, theirs = ([lp for o in run for lp in o.logprobs or []] for run in (together[key], outs))
            assert all((o.logprobs is None) == (request[1].logprobs is None) for o in together[key] + outs)
            for x, y in zip(ours, theirs, strict=True):  # batched matmuls differ in the last bits
                assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-5)
                assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_mirostat_carries_mu_from_step_to_step(weights):
    params = SamplingParams(temperature=1.0, mirostat_target=2.0, mirostat_lr=0.5, seed=0, max_tokens=6,
                            ignore_eos=True)
    engine = make_engine(weights)
    engine.add_request("r", _prompt(20, 10), params)
    mus = []
    while engine.has_work():
        seq = engine.seqs["r"][0]
        mus.append(seq.mirostat_mu)
        engine.step()
    assert mus[0] == 4.0  # Mirostat starts at twice the target
    assert len(set(mus)) > 2  # and moves with every sampled token
