"""The batched sampler against transformers' logits processors, OpenAI's penalty formula, Mirostat v2's
update rule and the filtered distributions it must draw from; seeds, mixed batches and logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ember.engine.request import SamplingParams
from ember.engine.sampler import (
    apply_frequency_presence,
    apply_logit_bias,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    draw,
    mirostat_filter,
    prompt_logprobs,
    sample,
)


@dataclass
class Row:
    """What sample() reads of a sequence."""

    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    mirostat_mu: float | None = None
    matcher: object | None = None  # a structured-output constraint; None: unconstrained


def make_row(params: SamplingParams, seed: int | None = None, prompt: list[int] | None = None,
             output: list[int] | None = None) -> Row:
    prompt, output = list(prompt or []), list(output or [])
    return Row(params, None if seed is None else torch.Generator().manual_seed(seed), prompt + output, len(prompt),
               None if params.mirostat_target is None else 2 * params.mirostat_target)


def advance(rows: list[Row], logits: torch.Tensor):
    """One decoding step: sample, then append each token and carry Mirostat's mu, as the engine does."""
    out = sample(logits, rows)
    for r, token, mu in zip(rows, out.token_ids, out.mirostat_mu, strict=True):
        r.token_ids.append(token)
        r.mirostat_mu = mu
    return out


def random_logits(batch: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def assert_same_filter(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same -inf mask, finite values equal within 1e-6."""
    assert torch.equal(ours.isneginf(), ref.isneginf()), (ours.isfinite().sum(-1), ref.isfinite().sum(-1))
    assert not ours.isnan().any() and not ours.isposinf().any()
    torch.testing.assert_close(ours[ours.isfinite()], ref[ref.isfinite()], rtol=0, atol=1e-6)


def assert_filter_did_something(ref: torch.Tensor) -> None:
    """Keeps the comparisons honest: some row lost tokens, and some row kept more than one."""
    assert ref.isneginf().any(), "no row was filtered: the comparison proves nothing"
    assert (ref.isfinite().sum(-1) > 1).any(), "every row was cut to one token: the comparison proves little"


def per_row(values: list[float], shift: int, batch: int) -> list[float]:
    return [values[(i + shift) % len(values)] for i in range(batch)]


# (batch, vocab, scale of the logits): flat to peaked, tiny to wider than the mass filters' first window
SHAPES = [(4, 32, 1.0), (5, 1000, 3.0), (3, 4096, 0.3), (6, 151, 10.0), (7, 2048, 1.5)]


# --------------------------------------------------------------------------------------------------
# each filter and penalty against transformers, per-row parameters in one batch


@pytest.mark.parametrize("batch,vocab,scale", SHAPES)
def test_top_k_matches_transformers(batch, vocab, scale):
    logits = random_logits(batch, vocab, scale, seed=vocab + batch)
    ks = per_row([1, 2, 5, 17, 50, vocab - 1, vocab, vocab + 10], vocab, batch)
    ours = apply_top_k(logits.clone(), torch.tensor(ks))
    ref = torch.cat([TopKLogitsWarper(k)(None, logits[r:r + 1].clone()) for r, k in enumerate(ks)])
    assert_same_filter(ours, ref)
    assert_filter_did_something(ref)
    assert ours.isfinite().sum(-1).tolist() == [min(k, vocab) for k in ks]


PROBABILITY_FILTERS = [  # (ours, transformers' warper, per-row values, shift them by vocab, seed factor)
    pytest.param(apply_top_p, TopPLogitsWarper, [0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.0], True, 2, id="top_p"),
    pytest.param(apply_min_p, MinPLogitsWarper, [0.3, 0.9, 0.05, 0.0, 0.01, 0.1, 1.0], False, 3, id="min_p"),
    pytest.param(apply_typical_p, TypicalLogitsWarper, [0.2, 0.5, 0.8, 0.9, 0.95, 0.05], True, 4, id="typical_p"),
]


@pytest.mark.parametrize("ours_fn,warper,values,shift,factor", PROBABILITY_FILTERS)
@pytest.mark.parametrize("batch,vocab,scale", SHAPES)
def test_probability_filters_match_transformers(batch, vocab, scale, ours_fn, warper, values, shift, factor):
    logits = random_logits(batch, vocab, scale, seed=factor * vocab + batch)
    ps = per_row(values, vocab if shift else 0, batch)
    ours = ours_fn(logits.clone(), torch.tensor(ps))
    ref = torch.cat([warper(p)(None, logits[r:r + 1].clone()) for r, p in enumerate(ps)])
    assert_same_filter(ours, ref)
    assert_filter_did_something(ref)


def test_mass_filters_on_already_masked_logits_match_transformers():
    """Inside sample() top_p and typical_p see logits that earlier filters set to -inf."""
    logits = random_logits(4, 500, 2.0, seed=11)
    masked = apply_top_k(logits, torch.tensor([40, 200, 3, 500]))
    for ours_fn, warper, values in ((apply_top_p, TopPLogitsWarper, [0.5, 0.9, 0.7, 0.3]),
                                    (apply_typical_p, TypicalLogitsWarper, [0.5, 0.9, 0.7, 0.3])):
        ours = ours_fn(masked.clone(), torch.tensor(values))
        ref = torch.cat([warper(v)(None, masked[r:r + 1].clone()) for r, v in enumerate(values)])
        assert_same_filter(ours, ref)


@pytest.mark.parametrize("batch,vocab,scale", SHAPES)
def test_repetition_penalty_matches_transformers(batch, vocab, scale):
    logits = random_logits(batch, vocab, scale, seed=5 * vocab + batch)
    g = torch.Generator().manual_seed(vocab)
    penalties = per_row([1.3, 0.7, 2.0, 1.0, 1.05], vocab, batch)
    # different lengths, repeated ids, and the extremes of the vocabulary
    tokens = [torch.randint(0, vocab, (3 + 7 * r,), generator=g).tolist() + [0, vocab - 1, 0] for r in range(batch)]
    ours = apply_repetition_penalty(logits.clone(), tokens, torch.tensor(penalties))
    ref = torch.cat([RepetitionPenaltyLogitsProcessor(p)(torch.tensor([t]), logits[r:r + 1].clone())
                     for r, (t, p) in enumerate(zip(tokens, penalties, strict=True))])
    assert ours.isfinite().all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert not torch.equal(ours, logits)


def test_repetition_penalty_row_without_tokens_is_untouched():
    logits = random_logits(3, 50, 2.0, seed=12)
    ours = apply_repetition_penalty(logits.clone(), [[1, 2], [], [49]], torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(ours[1], logits[1])
    ref = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[1, 2]]), logits[:1].clone())
    torch.testing.assert_close(ours[:1], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.6])
def test_temperature_is_transformers_warper_in_sample(temperature):
    """Seed by seed, a plain row's token is the one draw() takes from softmax(TemperatureLogitsWarper(t))."""
    logits = random_logits(1, 64, 2.0, seed=13)
    probs = TemperatureLogitsWarper(temperature)(None, logits.clone()).softmax(-1)[0]
    plain = logits.softmax(-1)[0]
    differs = 0
    for seed in range(150):
        token = sample(logits, [make_row(SamplingParams(temperature=temperature), seed)]).token_ids[0]
        assert token == drawn(probs, seed), seed
        differs += token != drawn(plain, seed)
    assert (differs > 0) == (temperature != 1.0)


# --------------------------------------------------------------------------------------------------
# frequency, presence and logit_bias against their formulas


def test_frequency_presence_openai_formula():
    vocab = 40
    logits = random_logits(4, vocab, 2.0, seed=14)
    tokens = [[3, 3, 3, 7, 1], [], [0, 39, 39], [5, 6, 5, 6, 5, 2]]
    freq = [0.5, 1.0, -0.7, 2.0]
    pres = [0.25, 1.0, 1.5, -0.4]
    ours = apply_frequency_presence(logits.clone(), tokens, torch.tensor(freq), torch.tensor(pres))
    expected = logits.clone()
    for r, ids in enumerate(tokens):
        for t in set(ids):
            count = ids.count(t)
            expected[r, t] -= count * freq[r] + (count > 0) * pres[r]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert torch.equal(ours[1], logits[1])
    assert ours[0, 3] == pytest.approx(float(logits[0, 3]) - 3 * 0.5 - 0.25, abs=1e-6)


def test_frequency_presence_in_sample_count_output_tokens_only():
    """Greedy rows expose the penalised logits: token 0 leads token 1 by exactly 1.0."""
    logits = torch.full((1, 8), -5.0)
    logits[0, 0], logits[0, 1] = 5.0, 4.0

    def greedy(prompt, output, freq, pres):
        p = SamplingParams(temperature=0.0, frequency_penalty=freq, presence_penalty=pres)
        return sample(logits, [make_row(p, prompt=prompt, output=output)]).token_ids[0]

    assert greedy([0] * 10, [], 2.0, 2.0) == 0  # prompt occurrences are not penalised
    assert greedy([0] * 10, [0], 0.6, 0.5) == 1  # 5 - (0.6 + 0.5) = 3.9 < 4
    assert greedy([0] * 10, [0], 0.4, 0.5) == 0  # 5 - (0.4 + 0.5) = 4.1 > 4
    assert greedy([], [0, 0], 0.3, 0.5) == 1  # 5 - (2 * 0.3 + 0.5) = 3.9
    assert greedy([], [0, 0], 0.2, 0.5) == 0  # 5 - (2 * 0.2 + 0.5) = 4.1
    assert greedy([], [0, 0, 0], 0.0, 1.1) == 1  # presence counts once: 5 - 1.1 = 3.9
    assert greedy([], [0, 0, 0], 0.0, 0.9) == 0
    assert greedy([], [1, 1], -0.6, 0.0) == 1  # negative penalties encourage repetition: 4 + 1.2 > 5
    assert greedy([], [1, 1], -0.4, 0.0) == 0  # 4 + 0.8 < 5


def test_logit_bias_is_added():
    logits = random_logits(3, 30, 1.0, seed=15)
    biases = [{1: 2.5, 4: -1.0, 29: 100.0}, {}, {0: -100.0}]
    ours = apply_logit_bias(logits.clone(), biases)
    expected = logits.clone()
    for r, b in enumerate(biases):
        for t, v in b.items():
            expected[r, t] += v
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_logit_bias_forces_and_bans_tokens_in_sample():
    logits = random_logits(1, 100, 3.0, seed=16)
    order = logits[0].argsort(descending=True).tolist()
    top, second, worst = order[0], order[1], order[-1]
    greedy = SamplingParams(temperature=0.0, logit_bias={worst: 100.0})
    assert sample(logits, [make_row(greedy)]).token_ids == [worst]
    greedy = SamplingParams(temperature=0.0, logit_bias={top: -100.0})
    assert sample(logits, [make_row(greedy)]).token_ids == [second]
    forced = SamplingParams(temperature=1.0, logit_bias={worst: 100.0})
    assert {sample(logits, [make_row(forced, seed)]).token_ids[0] for seed in range(200)} == {worst}
    banned = set(order[:3])
    ban = SamplingParams(temperature=1.0, logit_bias=dict.fromkeys(banned, -100.0))
    drawn = [sample(logits, [make_row(ban, seed)]).token_ids[0] for seed in range(300)]
    assert not banned & set(drawn)
    unbanned = [sample(logits, [make_row(SamplingParams(temperature=1.0), seed)]).token_ids[0] for seed in range(300)]
    assert banned & set(unbanned)  # without the bias these tokens are drawn


# --------------------------------------------------------------------------------------------------
# the whole pipeline, in the docstring's order, against transformers' processors


def reference_logits(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """One row through bias → repetition → frequency/presence → temperature → min_p → top_k →
    typical_p → top_p, with transformers' processors wherever transformers has one."""
    p = row.params
    x = logits.clone()
    for t, v in p.logit_bias.items():
        x[0, t] += v
    if p.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([row.token_ids]), x)
    output = row.token_ids[row.num_prompt_tokens:]
    for t in set(output):
        x[0, t] -= output.count(t) * p.frequency_penalty + p.presence_penalty
    x = TemperatureLogitsWarper(p.temperature)(None, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.typical_p < 1:
        x = TypicalLogitsWarper(p.typical_p)(None, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(None, x)
    return x


def drawn(probs: torch.Tensor, seed: int) -> int:
    """The token draw() picks from one row of probabilities with a generator freshly seeded `seed`:
    sample() must pick the same one from that distribution (docstring step 10)."""
    return int(draw(probs.unsqueeze(0), [torch.Generator().manual_seed(seed)])[0])


PIPELINES = [
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(temperature=0.9, min_p=0.05, top_k=30, typical_p=0.9, top_p=0.8),
    SamplingParams(temperature=1.1, min_p=0.02, top_k=60, typical_p=0.5, top_p=0.95),
    SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3,
                   logit_bias={2: 3.0, 5: -2.0, 9: 1.5}),
    SamplingParams(temperature=1.0, typical_p=0.7, repetition_penalty=0.8, logit_bias={1: 4.0}),
]


@pytest.mark.parametrize("params", PIPELINES, ids=range(len(PIPELINES)))
def test_sample_draws_from_the_transformers_pipeline(params):
    logits = random_logits(1, 200, 2.0, seed=17)
    prompt, output = [2, 5, 9, 9, 40, 41], [5, 9, 1, 1, 1, 77]
    row = make_row(params, prompt=prompt, output=output)
    probs = reference_logits(logits, row).softmax(-1)[0]
    plain = (logits[0] / params.temperature).softmax(-1)
    differs = 0
    for seed in range(100):
        got = sample(logits, [make_row(params, seed, prompt, output)]).token_ids[0]
        assert got == drawn(probs, seed), seed
        differs += got != drawn(plain, seed)
    assert differs > 0  # the filters and penalties changed the draws


# --------------------------------------------------------------------------------------------------
# Mirostat v2


def mirostat_by_hand(logits: torch.Tensor, temperature: float, mu: float) -> torch.Tensor:
    """The truncated, renormalised distribution of Mirostat v2 for one row."""
    probs = (logits / temperature).softmax(-1)
    keep = -probs.log2() <= mu
    keep[probs.argmax()] = True
    q = torch.where(keep, probs, 0.0)
    return q / q.sum()


def test_mirostat_filter_keeps_tokens_within_mu_bits():
    logits = random_logits(4, 300, 2.0, seed=18)
    mu = [0.0, 5.0, 7.0, 20.0]
    ours = mirostat_filter(logits.clone(), torch.tensor(mu))
    for r, m in enumerate(mu):
        surprise = -logits[r].log_softmax(-1) / math.log(2)
        keep = surprise <= m
        keep[logits[r].argmax()] = True
        assert torch.equal(ours[r].isfinite(), keep), r
        assert torch.equal(ours[r][keep], logits[r][keep])
    assert ours[0].isfinite().sum() == 1 and 1 < ours[1].isfinite().sum() < ours[2].isfinite().sum()


@pytest.mark.parametrize("ignored", [{}, {"top_k": 1, "top_p": 0.1, "min_p": 0.9, "typical_p": 0.1}])
@pytest.mark.parametrize("mu", [None, 0.5, 3.0, 9.0])
def test_mirostat_one_step_by_hand(mu, ignored):
    """mu_new = mu - lr * (surprise - target), the surprise being -log2 q(token) in the truncated,
    renormalised distribution q; Mirostat rows skip min_p, top_k, typical_p and top_p."""
    target, lr, temperature = 4.0, 0.3, 0.8
    params = SamplingParams(temperature=temperature, mirostat_target=target, mirostat_lr=lr, **ignored)
    logits = random_logits(1, 256, 2.0, seed=19)
    start = 2 * target if mu is None else mu
    q = mirostat_by_hand(logits[0], temperature, start)
    seen = set()
    for seed in range(40):
        row = make_row(params, seed)
        assert row.mirostat_mu == 2 * target
        row.mirostat_mu = start
        out = sample(logits, [row])
        token = out.token_ids[0]
        assert token == drawn(q, seed)
        assert q[token] > 0
        surprise = -math.log2(q[token].item())
        assert out.mirostat_mu[0] == pytest.approx(start - lr * (surprise - target), abs=1e-5)
        seen.add(token)
    assert (len(seen) == 1) == (mu == 0.5)  # mu below the top token's surprise keeps the argmax only


def test_mirostat_mu_is_none_for_other_rows():
    logits = random_logits(2, 50, 1.0, seed=20)
    rows = [make_row(SamplingParams(temperature=1.0), 1), make_row(SamplingParams(temperature=0.0))]
    assert sample(logits, rows).mirostat_mu == [None, None]


@pytest.mark.parametrize("target", [3.0, 5.0])
def test_mirostat_observed_surprise_tracks_target(target):
    """2000 steps carrying mu, on a slowly wandering distribution of about 8 bits of entropy: the mean
    observed surprise lands on the target. (One row per call: a batch of two would make torch split
    each softmax over threads, which crawls on a busy machine.)"""
    steps, vocab = 2000, 2000
    g = torch.Generator().manual_seed(21)
    base = torch.randn(vocab, generator=g) * 2.0
    entropy = -(base.softmax(-1) * base.log_softmax(-1)).sum().item() / math.log(2)
    assert entropy > target + 3  # untruncated sampling would sit far above the target
    row = make_row(SamplingParams(temperature=1.0, mirostat_target=target, mirostat_lr=0.1), seed=100)
    surprises = []
    drift = torch.zeros(vocab)
    for _ in range(steps):
        drift = 0.99 * drift + 0.1 * torch.randn(vocab, generator=g)
        logits = (base + drift).unsqueeze(0)
        mu = row.mirostat_mu
        token = advance([row], logits).token_ids[0]
        surprises.append(-math.log2(mirostat_by_hand(logits[0], 1.0, mu)[token].item()))
    mean = sum(surprises) / steps
    assert abs(mean - target) < 0.3, mean


# --------------------------------------------------------------------------------------------------
# distribution tests: chi-square of seeded draws against the filtered distribution

_Z_999 = 3.090232306167813  # standard normal quantile at 0.999


def chi_square_critical(df: int) -> float:
    """Critical value of chi-square at p = 0.001 (Wilson–Hilferty; slightly conservative)."""
    h = 2 / (9 * df)
    return df * (1 - h + _Z_999 * math.sqrt(h)) ** 3


def test_chi_square_critical_values():
    for df, exact in ((1, 10.828), (5, 20.515), (10, 29.588), (20, 45.315), (30, 59.703), (50, 86.661)):
        assert exact <= chi_square_critical(df) <= exact * 1.035, df


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom, pooling the cells expected fewer than 5 times."""
    n = counts.sum().item()
    expected = probs.double() * n
    big = expected >= 5
    obs = counts[big].double().tolist() + [counts[~big].sum().item()]
    exp = expected[big].tolist() + [expected[~big].sum().item()]
    if exp[-1] < 5:  # fold a small pooled cell into the smallest big one
        obs[-2:] = [obs[-2] + obs[-1]]
        exp[-2:] = [exp[-2] + exp[-1]]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    return stat, len(exp) - 1


DISTRIBUTIONS = {
    "temperature": (SamplingParams(temperature=0.7), [TemperatureLogitsWarper(0.7)]),
    "top_p": (SamplingParams(temperature=1.0, top_p=0.8), [TopPLogitsWarper(0.8)]),
    "min_p": (SamplingParams(temperature=1.0, min_p=0.1), [MinPLogitsWarper(0.1)]),
    "typical_p": (SamplingParams(temperature=1.0, typical_p=0.7), [TypicalLogitsWarper(0.7)]),
    "top_k+top_p@1.4": (SamplingParams(temperature=1.4, top_k=12, top_p=0.9),
                        [TemperatureLogitsWarper(1.4), TopKLogitsWarper(12), TopPLogitsWarper(0.9)]),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_draws_follow_the_filtered_distribution(name):
    params, warpers = DISTRIBUTIONS[name]
    vocab, draws = 40, 6000
    logits = random_logits(1, vocab, 1.5, seed=22)
    ref = logits.clone()
    for w in warpers:
        ref = w(None, ref)
    probs = ref.softmax(-1)[0]
    support = probs > 0
    if name != "temperature":
        assert 2 < int(support.sum()) < vocab  # the filter removed some tokens and left a choice
    row = make_row(params, seed=1234)
    tokens = [sample(logits, [row]).token_ids[0] for _ in range(draws)]
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab)
    assert counts[~support].sum() == 0, "a filtered-out token was drawn"
    stat, df = chi_square(counts, probs)
    assert stat < chi_square_critical(df), (stat, df)
    # the test can tell: the unfiltered, untempered distribution fails it
    wrong, df_wrong = chi_square(counts, logits.softmax(-1)[0])
    assert wrong > chi_square_critical(df_wrong)


def test_draw_is_the_inverse_cdf_of_each_rows_probs():
    """Rows drawn with generators seeded alike must all be the inverse CDF at one shared uniform u:
    the intervals [F(t-), F(t)) of their tokens intersect. Zero-probability tokens are never drawn."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0], [0.25] * 4,
                          [0.7, 0.1, 0.1, 0.1]])
    fine = torch.full((1, 1000), 1e-3)  # pins u to within 0.001
    counts = torch.zeros(5, 4)
    for seed in range(300):
        tokens = draw(probs, [torch.Generator().manual_seed(seed) for _ in range(5)]).tolist()
        tokens.append(int(draw(fine, [torch.Generator().manual_seed(seed)])[0]))
        lo, hi = 0.0, 1.0
        for p, t in zip([*probs, fine[0]], tokens, strict=True):
            cumulative = p.double().cumsum(-1) / p.double().sum()
            lo = max(lo, cumulative[t - 1].item() if t else 0.0)
            hi = min(hi, cumulative[t].item())
        assert lo <= hi + 1e-6, (seed, tokens)
        counts[torch.arange(5), torch.tensor(tokens[:5])] += 1
    assert counts[0, 0] == counts[0, 2] == 0 and counts[2, :3].sum() == 0
    stat, df = chi_square(counts[3], probs[3])
    assert stat < chi_square_critical(df)


def test_draw_uses_each_rows_own_generator():
    probs = torch.rand(4, 50, generator=torch.Generator().manual_seed(28)).softmax(-1)
    seeds = [3, 1, 4, 1]
    together = draw(probs, [torch.Generator().manual_seed(s) for s in seeds]).tolist()
    assert together == [drawn(p, s) for p, s in zip(probs, seeds, strict=True)]


# --------------------------------------------------------------------------------------------------
# greedy, seeds and mixed batches


def test_greedy_rows_take_the_argmax_without_a_generator():
    logits = random_logits(5, 300, 2.0, seed=23)
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(5)]
    assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


MIXED = [
    SamplingParams(temperature=0.0, logprobs=2),  # greedy
    SamplingParams(temperature=0.8, top_k=5),
    SamplingParams(temperature=1.0, min_p=0.1, logprobs=0),
    SamplingParams(temperature=1.2, typical_p=0.6),
    SamplingParams(temperature=1.0, mirostat_target=4.0, mirostat_lr=0.2, logprobs=3),
    SamplingParams(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4, top_p=0.9),
    SamplingParams(temperature=1.0, logit_bias={3: 5.0, 7: -100.0}, logprobs=1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.7, min_p=0.02, typical_p=0.95),
    SamplingParams(temperature=0.0, logit_bias={11: 2.0}, repetition_penalty=2.0, frequency_penalty=0.3),
    SamplingParams(temperature=1.0, mirostat_target=2.0, mirostat_lr=0.1),
    SamplingParams(temperature=1.0),  # unseeded: draws from torch's global generator
]
UNSEEDED = len(MIXED) - 1


def run_alone_and_together(steps: int = 25):
    vocab = 300
    g = torch.Generator().manual_seed(24)
    all_logits = [torch.randn(len(MIXED), vocab, generator=g) * 2.0 for _ in range(steps)]
    prompts = [torch.randint(0, vocab, (5 + i,), generator=g).tolist() for i in range(len(MIXED))]
    seeds: list[int | None] = [1000 + i for i in range(len(MIXED))]
    seeds[UNSEEDED] = None
    together = [make_row(p, s, prompt) for p, s, prompt in zip(MIXED, seeds, prompts, strict=True)]
    batch_outs = [advance(together, logits) for logits in all_logits]
    alone = []
    for i, (p, s, prompt) in enumerate(zip(MIXED, seeds, prompts, strict=True)):
        row = make_row(p, s, prompt)
        alone.append((row, [advance([row], logits[i:i + 1]) for logits in all_logits]))
    return all_logits, together, batch_outs, alone


def test_mixed_batch_rows_match_each_row_sampled_alone():
    all_logits, together, batch_outs, alone = run_alone_and_together()
    for i, (row, outs) in enumerate(alone):
        if i == UNSEEDED:
            continue
        assert together[i].token_ids == row.token_ids, (i, MIXED[i])
        for step, (b, a) in enumerate(zip(batch_outs, outs, strict=True)):
            assert (b.mirostat_mu[i] is None) == (a.mirostat_mu[0] is None)
            if a.mirostat_mu[0] is not None:
                assert b.mirostat_mu[i] == pytest.approx(a.mirostat_mu[0], abs=1e-6), (i, step)
            assert (b.logprobs[i] is None) == (a.logprobs[0] is None) == (MIXED[i].logprobs is None)
            if a.logprobs[0] is not None:
                assert b.logprobs[i].token_id == a.logprobs[0].token_id
                assert b.logprobs[i].logprob == pytest.approx(a.logprobs[0].logprob, abs=1e-6)
                assert [t for t, _ in b.logprobs[i].top] == [t for t, _ in a.logprobs[0].top]
    # and each row did get its own parameters
    prompt_len = [r.num_prompt_tokens for r in together]
    for step, logits in enumerate(all_logits):
        tokens = [r.token_ids[prompt_len[i] + step] for i, r in enumerate(together)]
        assert tokens[0] == int(logits[0].argmax())
        assert tokens[1] in logits[1].topk(5).indices.tolist()
        assert tokens[6] != 7
        assert tokens[7] in logits[7].topk(20).indices.tolist()
    assert len({tuple(r.token_ids[n:]) for r, n in zip(together, prompt_len, strict=True)}) == len(MIXED)


def test_same_seed_same_draws_different_seed_different_draws():
    logits = random_logits(1, 300, 1.0, seed=25)
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def draws(seed):
        row = make_row(params, seed)
        return [sample(logits, [row]).token_ids[0] for _ in range(50)]

    assert draws(7) == draws(7)
    a, b = draws(7), draws(8)
    assert a != b
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 25
    assert len(set(a)) > 10  # the draws move along the generator's stream


# --------------------------------------------------------------------------------------------------
# logprobs


def test_logprobs_are_of_the_raw_logits():
    vocab = 120
    logits = random_logits(6, vocab, 2.0, seed=26)
    raw = logits.log_softmax(-1)
    low = int(logits[3].argmin())
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, frequency_penalty=0.5,
                       logit_bias={int(logits[0].argmax()): -100.0}, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logit_bias={low: 100.0}, logprobs=3),
        SamplingParams(temperature=1.0, mirostat_target=3.0, logprobs=1),
        SamplingParams(temperature=2.0, typical_p=0.5, min_p=0.05, logprobs=20),
    ]
    rows = [make_row(p, seed=50 + i, prompt=[1, 2, 3], output=[4, 4, 5]) for i, p in enumerate(params)]
    out = sample(logits, rows)
    assert out.token_ids[3] == low
    assert out.token_ids[0] != int(logits[0].argmax())
    for i, (p, lp, token) in enumerate(zip(params, out.logprobs, out.token_ids, strict=True)):
        if p.logprobs is None:
            assert lp is None
            continue
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert len(lp.top) == p.logprobs
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected = raw[i].topk(p.logprobs) if p.logprobs else None
        assert [t for t, _ in lp.top] == ([] if expected is None else expected.indices.tolist())
        for (t, v) in lp.top:
            assert v == pytest.approx(raw[i, t].item(), abs=1e-6)
    assert out.logprobs[1].top == []
    assert out.logprobs[3].logprob < raw[3].max().item() - 1  # forced by the bias, reported as the model saw it


def test_prompt_logprobs_match_log_softmax():
    logits = random_logits(5, 80, 2.0, seed=27)
    targets = [3, 79, 0, 41, 41]
    raw = logits.log_softmax(-1)
    for k in (0, 1, 4):
        out = prompt_logprobs(logits, targets, k)
        assert len(out) == 5
        for r, (lp, t) in enumerate(zip(out, targets, strict=True)):
            assert lp.token_id == t
            assert lp.logprob == pytest.approx(raw[r, t].item(), abs=1e-6)
            assert [i for i, _ in lp.top] == raw[r].topk(k).indices.tolist()
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            assert values == pytest.approx(raw[r].topk(k).values.tolist(), abs=1e-6)
