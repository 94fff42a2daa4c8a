"""Batched sampling where every row carries its own parameters.

Order of operations, per row (vLLM's order; later filters see earlier ones' output):
  1. temperature: greedy rows (temperature 0) take the argmax of the raw logits and skip the rest;
     the others are divided by their temperature;
  2. top-k: keep the k largest logits (k <= 0: off);
  3. top-p: keep the smallest set of most likely tokens whose probability reaches p;
  4. draw: softmax, then the exponential-race trick (argmax of p / E, E ~ Exp(1)) with the row's
     own generator, so a seeded request draws the same numbers whatever shares its batch.

Parameters live in tensors built once per step, so the work is a handful of batched kernels, not
a Python loop over the vocabulary. Top-k and top-p avoid a full-vocabulary sort: they look at the
`torch.topk` candidates, widening the window only while some row's nucleus does not fit in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FIRST_WINDOW = 64


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float, 0 = greedy
    top_k: torch.Tensor  # [B] long, <= 0 = off
    top_p: torch.Tensor  # [B] float, 1 = off
    generators: list[torch.Generator | None]

    @classmethod
    def build(cls, params: list, generators: list[torch.Generator | None], device: torch.device
              ) -> SamplingBatch:
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            generators=generators,
        )


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k, then outside its top-p nucleus.

    Top-p sees the top-k survivors renormalised, as chained transformers warpers do.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    off = (k == vocab) & (top_p >= 1)
    probs = logits.softmax(-1)
    window = min(_FIRST_WINDOW, vocab)
    while True:
        top_probs, top_ids = probs.topk(window, dim=-1)  # descending
        in_k = torch.arange(window, device=logits.device).unsqueeze(0) < k.unsqueeze(1)
        kept = torch.where(in_k, top_probs, 0)
        cumulative = kept.cumsum(-1)
        k_inside = k <= window
        # the mass top-p is measured against: all of top-k when it fits the window, else the whole vocab
        total = torch.where(k_inside, cumulative[:, -1], 1.0).unsqueeze(1)
        limit = top_p.unsqueeze(1) * total
        nucleus_inside = cumulative[:, -1:] >= limit
        fits = off | k_inside | ((k == vocab) & nucleus_inside.squeeze(1))
        if bool(fits.all()) or window == vocab:
            break
        window = min(window * 4, vocab)
    keep = in_k & (cumulative - kept < limit)  # the mass before a token is still short of p
    keep[:, 0] = True  # top_p = 0 still keeps the most likely token
    masked = torch.full_like(logits, float("-inf"))
    masked.scatter_(1, top_ids, torch.where(keep, logits.gather(1, top_ids), float("-inf")))
    return torch.where(off.unsqueeze(1), logits, masked)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row of `logits` ([B, V] float32)."""
    greedy = batch.temperature <= 0
    out = logits.argmax(-1)
    if bool(greedy.all()):
        return out
    rows = (~greedy).nonzero().squeeze(1)
    x = logits[rows] / batch.temperature[rows].unsqueeze(1)
    top_k, top_p = batch.top_k[rows], batch.top_p[rows]
    filtered = (top_k > 0) | (top_p < 1)
    if bool(filtered.any()):
        x[filtered] = _filter_top_k_top_p(x[filtered], top_k[filtered], top_p[filtered])
    probs = x.softmax(-1)
    noise = torch.empty_like(probs)
    for i, row in enumerate(rows.tolist()):
        noise[i].exponential_(generator=batch.generators[row])
    out[rows] = (probs / noise).argmax(-1)
    return out
