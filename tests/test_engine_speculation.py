"""Speculative decoding in the engine (tiny random model): drafts from a prediction or from prompt lookup
change how many steps a request takes, never its tokens, logprobs or the prefix cache's contents."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams, StepOutput
from ember.engine.runner import ModelRunner
from ember.engine.sampler import sample
from ember.engine.sequence import Sequence
from ember.engine.spec.ngram import lookup
from ember.engine.spec.policy import DraftPriors, StepCost, allocate, new_draft_state
from ember.engine.spec.prediction import PredictionCursor
from ember.engine.spec.verify import Run, verify
from tests.test_sampler import chi_square, chi_square_critical, make_row, random_logits
from tests.tiny_model import EOS, VOCAB, greedy, make_engine, make_hf_model, weights_of

PROMPT_LEN = 24


@pytest.fixture(scope="module")
def weights():
    return weights_of(make_hf_model(seed=3))


def _prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _check_blocks(engine: LLMEngine) -> None:
    """After a step, a running sequence holds exactly the blocks its computed tokens fill: none left over
    from rejected drafts; reference counts match the tables."""
    bm = engine.block_manager
    refs = [0] * bm.num_blocks
    for seq in engine.scheduler.running:
        assert len(seq.block_table) == -(-seq.num_computed_tokens // bm.block_size), seq.request_id
        assert seq.num_computed_tokens <= seq.num_tokens
        for b in seq.block_table:
            refs[b] += 1
    assert refs == bm.ref_counts


def _drain(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
           ) -> dict[tuple[str, int], list[StepOutput]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[tuple[str, int], list[StepOutput]] = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault((o.request_id, o.index), []).append(o)
        _check_blocks(engine)
    assert engine.stats()["kv_blocks_used"] == 0
    return outs


def _tokens(outs: list[StepOutput]) -> list[int]:
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return [t for o in outs for t in o.token_ids]


def _one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[StepOutput]]:
    outs = _drain(engine, {"r": (prompt, params)})[("r", 0)]
    return _tokens(outs), outs


def test_a_right_prediction_is_accepted_and_changes_nothing_but_the_steps(weights):
    prompt, params = _prompt(1), greedy(40, logprobs=2)
    plain_engine = make_engine(weights, speculation="off")
    plain, plain_outs = _one(plain_engine, prompt, params)
    engine = make_engine(weights, speculation="off")
    ours, outs = _one(engine, prompt, replace(params, prediction=plain))
    assert ours == plain
    assert engine.counters.steps < plain_engine.counters.steps / 3
    spec = outs[-1].speculation
    assert spec.prediction_tokens == 40 and spec.prediction_accepted == spec.accepted > 30
    assert spec.prediction_rejected == 0 and spec.position_hits == spec.position_totals
    assert spec.acceptance().startswith(f"0:{spec.position_hits[0]}/{spec.position_totals[0]},1:")
    ours_lp = [lp for o in outs for lp in o.logprobs]
    plain_lp = [lp for o in plain_outs for lp in o.logprobs]
    assert [(x.token_id, [t for t, _ in x.top]) for x in ours_lp] == [(x.token_id, [t for t, _ in x.top])
                                                                     for x in plain_lp]
    assert [x.logprob for x in ours_lp] == pytest.approx([x.logprob for x in plain_lp], abs=1e-5)


@pytest.mark.parametrize("edit", ["replace", "insert", "delete", "wrong"])
def test_an_edited_or_wrong_prediction_gives_the_same_output(weights, edit):
    prompt, params = _prompt(2), greedy(48)
    plain, _ = _one(make_engine(weights, speculation="off"), prompt, params)
    prediction = {"replace": plain[:20] + [7, 8, 9] + plain[23:],
                  "insert": plain[:20] + [7, 8, 9] + plain[20:],
                  "delete": plain[:20] + plain[26:],
                  "wrong": _prompt(99, 48)}[edit]
    ours, outs = _one(make_engine(weights, speculation="off"), prompt, replace(params, prediction=prediction))
    assert ours == plain
    spec = outs[-1].speculation
    if edit != "wrong":  # the unchanged span after the edit is found again and drafted
        assert spec.prediction_accepted > 24, spec
    assert spec.proposed == spec.accepted + spec.prediction_rejected + (spec.proposed - spec.prediction_accepted
                                                                        - spec.prediction_rejected)


def test_prompt_lookup_drafts_repeated_text_and_changes_nothing(weights):
    prompt = _prompt(3, 12) * 3  # a repeating context: the tiny model continues the pattern at times
    params = greedy(60)
    plain_engine, engine = make_engine(weights, speculation="off"), make_engine(weights)
    plain, _ = _one(plain_engine, prompt, params)
    ours, outs = _one(engine, prompt, params)
    assert ours == plain
    spec = outs[-1].speculation
    assert spec.proposed > 0 and spec.prediction_tokens == 0
    # off per request: no drafts at all
    off, off_outs = _one(make_engine(weights), prompt, replace(params, speculate=False))
    assert off == plain and off_outs[-1].speculation is None


SAMPLED = [
    SamplingParams(temperature=0.8, seed=11, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, seed=12, max_tokens=40, ignore_eos=True,
                   logprobs=1),
    SamplingParams(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, seed=13,
                   max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=1.0, mirostat_target=3.0, mirostat_lr=0.3, seed=14, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.0, repetition_penalty=1.2, logit_bias={5: 2.0}, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.7, n=3, seed=15, max_tokens=30, ignore_eos=True),
]


@pytest.mark.parametrize("i", range(len(SAMPLED)))
def test_seeded_sampling_penalties_and_mirostat_are_the_same_with_a_prediction(weights, i):
    """A prediction's drafts see the same history and draw the same numbers, at any temperature."""
    params = SAMPLED[i]
    prompt = _prompt(20 + i)
    plain = _drain(make_engine(weights, speculation="off"), {"r": (prompt, params)})
    tokens = {k: _tokens(v) for k, v in plain.items()}
    prediction = tokens[("r", 0)][:15] + [1, 2] + tokens[("r", 0)][17:]
    ours = _drain(make_engine(weights, speculation="off"), {"r": (prompt, replace(params, prediction=prediction))})
    assert {k: _tokens(v) for k, v in ours.items()} == tokens
    assert ours[("r", 0)][-1].speculation.prediction_accepted > 5
    if params.logprobs is not None:
        a = [lp.logprob for o in ours[("r", 0)] for lp in o.logprobs]
        b = [lp.logprob for o in plain[("r", 0)] for lp in o.logprobs]
        assert a == pytest.approx(b, abs=1e-5)


def test_max_tokens_and_stop_tokens_cut_inside_an_accepted_run(weights):
    prompt = _prompt(4)
    plain, _ = _one(make_engine(weights, speculation="off"), prompt, greedy(40))
    # max_tokens inside the prediction's run: never more than asked
    for max_tokens in (1, 2, 7, 13):
        ours, outs = _one(make_engine(weights, speculation="off"), prompt, greedy(max_tokens, prediction=plain))
        assert ours == plain[:max_tokens] and outs[-1].finish_reason == "length"
    # a stop token id in the middle of an accepted run ends the output there
    stop = plain[17]
    first = plain.index(stop)
    ours, outs = _one(make_engine(weights, speculation="off"), prompt,
                      greedy(40, prediction=plain, stop_token_ids=[stop]))
    assert ours == plain[:first + 1] and outs[-1].finish_reason == "stop"


def test_eos_inside_a_prediction_is_honoured(weights):
    prompt = _prompt(5)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain, plain_outs = _one(make_engine(weights, speculation="off"), prompt, replace(params, ignore_eos=True))
    forced = replace(params, logit_bias={EOS: 0.0})
    ours, _ = _one(make_engine(weights, speculation="off"), prompt, replace(forced, prediction=plain + [EOS]))
    ref, _ = _one(make_engine(weights, speculation="off"), prompt, forced)
    assert ours == ref


def test_a_batch_mixing_speculating_and_plain_sequences_gives_each_its_alone_output(weights):
    prompts = {f"r{i}": _prompt(30 + i, 10 + 7 * i) for i in range(6)}
    alone = {rid: _one(make_engine(weights, speculation="off"), p, greedy(32))[0] for rid, p in prompts.items()}
    requests = {rid: (p, greedy(32, prediction=alone[rid] if i % 2 else None, speculate=i % 3 != 0))
                for i, (rid, p) in enumerate(prompts.items())}
    engine = make_engine(weights, max_num_batched_tokens=48)
    together = _drain(engine, requests)
    assert {rid: _tokens(together[(rid, 0)]) for rid in prompts} == alone
    assert engine.stats()["max_batch_seqs"] > 1


def test_the_prefix_cache_never_holds_a_rejected_draft(weights):
    """Blocks committed while drafts were rejected hold exactly the accepted tokens' K/V: a later request
    served from them decodes what an engine without a cache decodes."""
    prompt = _prompt(6, 18)
    plain, _ = _one(make_engine(weights, speculation="off"), prompt, greedy(45))
    # two wrong tokens in every ten: drafts rejected again and again, in blocks that fill and are cached later
    prediction = [(t + 1) % VOCAB if i % 10 in (7, 8) else t for i, t in enumerate(plain)]
    engine = make_engine(weights, speculation="off")
    ours, outs = _one(engine, prompt, greedy(45, prediction=prediction))
    assert ours == plain and outs[-1].speculation.prediction_rejected >= 3
    follow = prompt + plain + _prompt(7, 5)
    cached, cached_outs = _one(engine, follow, greedy(12))
    assert cached_outs[-1].num_cached_tokens >= 56
    fresh, _ = _one(make_engine(weights, enable_prefix_caching=False), follow, greedy(12))
    assert cached == fresh
    everything = follow + cached  # the first request's tokens are a prefix of it
    bm = engine.block_manager
    accepted = bm._chain(Sequence("x", everything, len(everything), SamplingParams()), len(everything) // 4)
    assert bm.cached and set(bm.cached) <= set(accepted)


def test_an_abort_between_verifications_leaves_nothing_allocated(weights):
    prompt = _prompt(8)
    plain, _ = _one(make_engine(weights, speculation="off"), prompt, greedy(40))
    engine = make_engine(weights)
    engine.add_request("r", prompt, greedy(40, prediction=plain, n=2))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    outs = engine.abort("r")
    assert {o.finish_reason for o in outs} == {"abort"} and not engine.has_work()
    assert engine.block_manager.num_used_blocks == 0


def test_n_samples_each_follow_the_prediction(weights):
    prompt = _prompt(9)
    plain = _drain(make_engine(weights, speculation="off"), {"r": (prompt, greedy(30, n=3))})
    ref = _tokens(plain[("r", 0)])
    ours = _drain(make_engine(weights, speculation="off"), {"r": (prompt, greedy(30, n=3, prediction=ref))})
    assert {k: _tokens(v) for k, v in ours.items()} == {k: _tokens(v) for k, v in plain.items()}
    assert all(ours[("r", i)][-1].speculation.prediction_accepted > 20 for i in range(3))


def test_attention_through_sdpa_verifies_drafts_too(weights):
    """Torch's path (CUDA, other dtypes) attends items of different query lengths in padded SDPA calls."""
    def sdpa_engine(**config) -> LLMEngine:
        engine = make_engine(weights, **config)
        engine.model.fused = engine.model.one_call = False
        engine.runner = ModelRunner(engine.model, engine.block_manager.num_blocks, engine.config.block_size)
        return engine

    prompts = {f"r{i}": _prompt(40 + i, 9 + 5 * i) for i in range(3)}
    kernel = {rid: _one(make_engine(weights, speculation="off"), p, greedy(24))[0] for rid, p in prompts.items()}
    requests = {rid: (p, greedy(24, prediction=kernel[rid][:12] + [3] + kernel[rid][13:]))
                for rid, p in prompts.items()}
    engine = sdpa_engine(max_num_batched_tokens=20)
    assert not engine.runner.cpu_attention
    together = _drain(engine, requests)
    assert {rid: _tokens(together[(rid, 0)]) for rid in prompts} == kernel


# verification on its own: the distribution it draws from


def test_verification_keeps_the_filtered_distribution():
    """A draft d is accepted with probability p(d); a rejection's token follows p without d, renormalised;
    so what is emitted follows p (chi-square against the filtered distribution, as the sampler's tests)."""
    vocab, draws = 24, 4000
    params = SamplingParams(temperature=1.0, top_k=16)
    logits = random_logits(1, vocab, 1.5, seed=5)
    probs = (logits / params.temperature).masked_fill(
        logits < logits.topk(16).values[..., -1:], float("-inf")).softmax(-1)[0]
    draft = int(probs.argsort()[-3])  # a likely token, not the likeliest
    first, replacement, accepted = [], [], 0
    for seed in range(draws):
        row = make_row(params, seed)
        run = Run(row, None, 0, [draft])
        verify([run], logits.expand(2, vocab), lambda r, t, mu: None)
        first.append(run.tokens[0])
        if run.accepted:
            accepted += 1
            assert len(run.tokens) == 2  # the token after an accepted draft is always sampled
        else:
            assert len(run.tokens) == 1
            replacement.append(run.tokens[0])
    counts = torch.bincount(torch.tensor(first), minlength=vocab)
    stat, df = chi_square(counts, probs)
    assert stat < chi_square_critical(df), (stat, df)
    p = float(probs[draft])
    assert abs(accepted / draws - p) < 4 * (p * (1 - p) / draws) ** 0.5
    rest = probs.clone()
    rest[draft] = 0
    stat, df = chi_square(torch.bincount(torch.tensor(replacement), minlength=vocab), rest / rest.sum())
    assert stat < chi_square_critical(df), (stat, df)
    # the test can tell: the draft's own token never comes back as a replacement
    assert draft not in replacement


def test_greedy_verification_accepts_the_longest_agreeing_prefix():
    logits = random_logits(4, 32, 2.0, seed=6)
    greedy_tokens = logits.argmax(-1).tolist()
    for drafts, accepted in ((greedy_tokens[:3], 3), (greedy_tokens[:1] + [99 % 32], 1), ([], 0)):
        drafts = [d if i >= accepted else greedy_tokens[i] for i, d in enumerate(drafts)]
        if accepted < len(drafts) and drafts[accepted] == greedy_tokens[accepted]:
            drafts[accepted] = (drafts[accepted] + 1) % 32
        run = Run(make_row(SamplingParams(temperature=0), 0), None, 0, drafts)
        verify([run], logits, lambda r, t, mu: None)
        assert run.accepted == accepted and run.tokens == greedy_tokens[:accepted + 1]
    assert sample(logits[:1], [make_row(SamplingParams(temperature=0), 0)]).token_ids == greedy_tokens[:1]


# the proposers


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    import numpy as np
    context = np.array([5, 6, 7, 8, 1, 5, 6, 9, 2, 3, 5, 6])
    assert lookup(context, 3) == [9, 2, 3]  # "5 6" last seen before "9 2 3"
    assert lookup(context, 3, min_n=3) == []
    assert lookup(np.array([1, 2, 3]), 4) == []


def test_the_prediction_cursor_resynchronises_after_an_edit():
    prediction = list(range(100, 140))
    cursor = PredictionCursor(prediction)
    output: list[int] = []
    assert cursor.propose(output, 4) == [100, 101]  # a place not yet confirmed by the output: 2 drafts
    for t in [100, 101]:
        cursor.observe(t)
        output.append(t)
    assert cursor.propose(output, 8) == list(range(102, 108))  # 2 confirmed: 2 + 2 * 2
    for t in [102, 7, 8]:  # an edit replaces 103..104 with 7, 8
        cursor.observe(t)
        output.append(t)
    assert cursor.propose(output, 3) == []  # nothing of the edit occurs in the prediction
    for t in [105, 106]:
        cursor.observe(t)
        output.append(t)
    assert cursor.propose(output, 8) == [107, 108, 109, 110]  # found by 2 tokens: 1 confirmed
    for t in [107, 9, 109]:  # a substituted token: the next one finds its place just ahead
        cursor.observe(t)
        output.append(t)
    assert cursor.propose(output, 8) == [110, 111]
    far = PredictionCursor(prediction)
    far.observe(139)  # a lone token far from the cursor is no place to resume from
    assert far.propose([139], 4) == []


def test_step_cost_prices_drafts_by_the_calibrated_shape_at_the_measured_level():
    cost = StepCost()
    assert cost.seconds(1, 8) > cost.seconds(1) > 0  # before calibration: a prior that rises slowly
    timings = {1: 0.010, 2: 0.013, 4: 0.012}  # 4 measured faster than 2: noise, read as 0.013
    cost.calibrate(lambda tokens: timings.get(tokens, 0.010 + 0.001 * tokens), max_tokens=17)
    assert cost.calibrated(4) == 0.013 and cost.calibrated(10) == pytest.approx(0.020)  # between 9 and 12
    assert cost.calibrated(30) == pytest.approx(0.040)  # past the grid, along its last two points
    assert cost.seconds(4, 5) == pytest.approx(0.013 + 0.006)
    cost.observe(4, 0.030)  # steps at a temperature, over long contexts: the level rises, the shape stays
    assert cost.seconds(4) == 0.030 and cost.seconds(4, 5) == pytest.approx(0.036)


# a Sapphire Rapids pair of cores running SmolLM2-135M (ms per forward pass by query positions, measured)
_MEASURED = {1: 9.9, 2: 13.4, 4: 15.7, 8: 16.9, 9: 17.4, 12: 18.2, 16: 19.7, 17: 24.4, 20: 25.3,
             24: 27.6, 32: 26.3, 33: 29.3, 40: 31.1, 48: 33.6, 64: 42.8, 65: 46.2, 96: 59.4, 128: 77.9}


def _measured_cost() -> StepCost:
    cost = StepCost()
    cost.calibrate(lambda tokens: _MEASURED.get(tokens, 9.9) / 1000, max_tokens=128)
    return cost


def test_allocation_drafts_freely_alone_and_not_at_all_in_a_large_batch_of_doubtful_drafts():
    cost = _measured_cost()
    # a lone stream with a good prediction: all but the draft that would take a 17th row (a second row tile)
    assert allocate([(0.9, 16)], 1, 1, cost) == [15]
    assert allocate([(0.99, 40)], 1, 1, cost) == [40]  # near-certain drafts pay for the second tile too
    assert allocate([(0.3, 8)], 1, 1, cost) == [0]  # 1.4 tokens in 13-17 ms do not beat 1 in 9.9
    assert sum(allocate([(0.3, 4)] * 16, 16, 16, cost)) == 0  # 16 doubtful streams: verifying costs more
    assert sum(allocate([(0.95, 8)] * 16, 16, 16, cost)) > 16  # 16 streams that almost always accept
    # the search looks past a dearer row count: 3 drafts alone cost more than 8 (17.3 vs 17.4 ms at 9 rows)
    assert allocate([(0.8, 8)], 1, 1, cost) == [8]


def test_allocation_maximises_tokens_per_second():
    cost = _measured_cost()
    proposals = [(0.7, 6), (0.5, 3), (0.9, 10)]
    counts = allocate(proposals, 3, 3, cost)

    def rate(counts):
        gain = sum(a ** j for (a, _), c in zip(proposals, counts, strict=True) for j in range(1, c + 1))
        return (3 + gain) / cost.seconds(3, sum(counts))

    import itertools
    best = max(itertools.product(*(range(n + 1) for _, n in proposals)), key=rate)
    assert rate(counts) == pytest.approx(rate(best), rel=0.02)


def test_a_proposer_out_of_favour_keeps_an_honest_record_through_its_shadows():
    """Proposals not verified are checked against the tokens that come instead: once the text turns
    repetitive, prompt lookup is trusted again without a single draft verified in between."""
    priors = DraftPriors(lookup=0.05)  # lookups failed everywhere lately
    state = new_draft_state(None, True, priors)
    context = [5, 6, 7, 8, 9, 10, 11, 12] * 2 + [5, 6]
    bar = 0.3
    assert state.drafts(context, 0, 16, bar) == []  # 0.05 < bar: a shadow only
    assert [s.tokens for s in state.shadows] == [[7, 8, 9, 10]]
    for _ in range(6):  # the text keeps repeating: every shadow comes true
        for token in [7, 8, 9, 10, 11, 12, 5, 6]:
            context.append(token)
            state.observe(token)
            state.drafts(context, 0, 16, bar)
    assert state.lookup.acceptance > 0.6 and priors.lookup > 0.05
    state.lookup.cooldown = 0
    state.shadows.clear()
    drafts = state.drafts(context, 0, 16, bar)
    assert drafts[:4] == [7, 8, 9, 10] and state.acceptance() > bar
    state.using(len(drafts))
    assert not state.shadows and state.stats.proposed == 0  # shadows never count as speculation
