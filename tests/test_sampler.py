"""The sampler's filters against transformers' warpers, and its draws against the filtered distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from ember.engine.request import SamplingParams
from ember.engine.sampler import SamplingBatch, _filter_top_k_top_p, sample


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (50, 1.0), (50, 0.8), (0, 0.5), (1000, 0.95), (3, 0.1),
                                         (1, 1.0), (0, 0.0)])
def test_filters_match_transformers(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 4096) * 3
    ref = logits.clone()
    if top_k > 0:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(max(top_p, 1e-9))(None, ref)
    ours = _filter_top_k_top_p(logits, torch.full((6,), top_k), torch.full((6,), top_p))
    assert torch.equal(ours.isinf(), ref.isinf())
    torch.testing.assert_close(ours[ours.isfinite()], ref[ref.isfinite()], rtol=0, atol=1e-6)


def test_mixed_rows_each_get_their_own_filter():
    torch.manual_seed(1)
    logits = torch.randn(3, 2048) * 2
    ours = _filter_top_k_top_p(logits, torch.tensor([5, 0, 0]), torch.tensor([1.0, 0.7, 1.0]))
    assert ours[0].isfinite().sum() == 5
    assert torch.equal(ours[1].isinf(), TopPLogitsWarper(0.7)(None, logits[1:2].clone())[0].isinf())
    assert ours[2].isfinite().all()


def _batch(params: list[SamplingParams], seeds: list[int]) -> SamplingBatch:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return SamplingBatch.build(params, gens, torch.device("cpu"))


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(4, 100)
    params = [SamplingParams(temperature=0.0)] * 2 + [SamplingParams(temperature=1.0)] * 2
    out = sample(logits, _batch(params, [0, 1, 2, 3]))
    assert out[:2].tolist() == logits[:2].argmax(-1).tolist()


def test_draws_follow_the_filtered_distribution():
    """Chi-square of 20k seeded draws against softmax(logits / T) restricted to the top-p nucleus."""
    torch.manual_seed(2)
    logits = torch.randn(1, 12) * 1.5
    params = SamplingParams(temperature=0.8, top_p=0.9)
    expected = _filter_top_k_top_p(logits / 0.8, torch.tensor([0]), torch.tensor([0.9])).softmax(-1)[0]
    batch = _batch([params], [7])
    draws = 20_000
    counts = torch.bincount(torch.cat([sample(logits, batch) for _ in range(draws)]), minlength=12).float()
    support = expected > 0
    assert counts[~support].sum() == 0
    exp_counts = expected[support] * draws
    chi2 = (((counts[support] - exp_counts) ** 2) / exp_counts).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, chi2  # far beyond the 99.9th percentile if biased


def test_same_seed_same_draws_regardless_of_neighbours():
    torch.manual_seed(3)
    logits = torch.randn(3, 500)
    p = SamplingParams(temperature=1.0)
    alone = [sample(logits[:1], _batch([p], [42])).item() for _ in range(1)]
    batch = _batch([p, p, p], [42, 1, 2])
    together = sample(logits, batch)[0].item()
    assert alone == [together]
