"""Verification: the tokens a step emits for each sample, drafts accepted or not.

Each sample's tokens are drawn position by position exactly as if one were decoded per step: the draft
at position j is accepted when the token sampled there equals it, and sampling goes on after it.
Penalties, Mirostat, grammars and seeds see the same history and draw the same random numbers as without
drafts, so the output is the same, token for token. At temperature 0 that keeps the longest prefix equal
to the greedy tokens. Above it a draft is kept with the probability the filtered distribution gives it,
and otherwise the inverse-CDF draw landed on another token, distributed as that distribution without the
draft, renormalised: speculative sampling's rule for a deterministic proposer. The token after the last
accepted draft is always sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ember.engine.request import TokenLogprob
from ember.engine.sampler import SamplingRow, sample
from ember.engine.step import StepItem


@dataclass(eq=False)
class Run:
    """One sample's tokens in a step, drawn from the logit rows from `first_row` on: one per draft and one
    after them."""

    seq: SamplingRow
    item: StepItem  # the scheduled item it came from (a fork shares its parent's)
    first_row: int
    drafts: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    accepted: int = 0
    reason: str | None = None  # why the sample finished, if it did


# takes a sampled token into the sequence (with its Mirostat mu); returns why the sequence finished, if it did
Append = Callable[[SamplingRow, int, float | None], str | None]


def _history_free(row: SamplingRow) -> bool:
    """Greedy with nothing that reads earlier tokens: every position's token is known at once."""
    p = row.params
    return (p.greedy and row.matcher is None and p.repetition_penalty == 1 and not p.frequency_penalty
            and not p.presence_penalty)


def _take(run: Run, position: int, token: int, logprob: TokenLogprob | None, mu: float | None,
          append: Append) -> bool:
    """The token sampled at `position` joins the run; whether sampling goes on after it."""
    run.tokens.append(token)
    run.logprobs.append(logprob)
    run.reason = append(run.seq, token, mu)
    accepted = position < len(run.drafts) and token == run.drafts[position]
    run.accepted += accepted
    return accepted and run.reason is None


def verify(runs: list[Run], logits: torch.Tensor, append: Append) -> None:
    """Fill each run's tokens, logprobs, accepted drafts and finish reason. Greedy runs whose tokens do not
    depend on the ones before take all their positions in one sampler call; the others go position by
    position, each position one call for every run still going."""
    at_once = [r for r in runs if r.drafts and _history_free(r.seq)]
    if at_once:
        rows = [r.first_row + j for r in at_once for j in range(len(r.drafts) + 1)]
        out = sample(logits[torch.tensor(rows, device=logits.device)],
                     [r.seq for r in at_once for _ in range(len(r.drafts) + 1)])
        first = 0
        for run in at_once:
            for j in range(len(run.drafts) + 1):
                i = first + j
                if not _take(run, j, out.token_ids[i], out.logprobs[i], out.mirostat_mu[i], append):
                    break
            first += len(run.drafts) + 1
    active, position = [r for r in runs if r not in at_once], 0
    while active:
        rows = torch.tensor([r.first_row + position for r in active], device=logits.device)
        out = sample(logits[rows], [r.seq for r in active])
        active = [run for run, token, logprob, mu in zip(active, out.token_ids, out.logprobs, out.mirostat_mu,
                                                          strict=True)
                  if _take(run, position, token, logprob, mu, append)]
        position += 1
