"""Batched sampling where every row carries its own parameters.

Order of operations, per row (vLLM's order, with typical_p and Mirostat where llama.cpp puts them;
each step sees the output of the ones before it):
  0. logprobs, when asked: log-softmax of the raw logits, kept aside for the sampled token and the
     row's k likeliest tokens (what is reported never depends on the steps below);
  1. grammar: a constrained row's disallowed tokens are masked, before anything else can prefer them;
  2. logit_bias is added;
  3. penalties: repetition (transformers': over prompt and output tokens, positive logits divided by
     the penalty, negative ones multiplied), then frequency and presence (OpenAI's: over output
     tokens, logit -= count * frequency_penalty + (count > 0) * presence_penalty);
  4. greedy rows (temperature 0) take the argmax of these logits and stop here;
  5. temperature divides the logits;
  6. Mirostat v2 rows keep the tokens whose surprise -log2 p is at most the row's mu (always the
     likeliest), draw from them renormalised, and move mu by lr * (target - observed surprise);
     they skip 7-10, as in llama.cpp;
  7. min_p: drop tokens less likely than min_p times the likeliest;
  8. top_k: keep the k likeliest;
  9. typical_p: keep the tokens whose surprise is closest to the entropy, up to that much mass;
 10. top_p: keep the likeliest tokens up to that much mass;
 11. draw: the inverse CDF of the row's distribution at one uniform number from the row's own
     generator, so a seeded request draws the same numbers whatever shares its batch.

Each filter masks logits to -inf and works on the rows that ask for it only; parameters travel as
tensors, so a step costs a few batched kernels, not a Python loop over the vocabulary. Nothing here
sorts the vocabulary: the mass-based filters look at `topk` candidates and widen the window only
while some row's kept set does not fit in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ember.engine.request import SamplingParams, TokenLogprob
from ember.structured.backend import Matcher, bitmask_words, unpack_bitmask

_FIRST_WINDOW = 256  # topk's cost hardly depends on k this small; most kept sets fit
_NEG_INF = float("-inf")


class SamplingRow(Protocol):
    """What the sampler reads of a sequence (ember.engine.sequence.Sequence satisfies it)."""

    params: SamplingParams
    generator: torch.Generator | None
    token_ids: list[int]
    num_prompt_tokens: int
    mirostat_mu: float | None
    matcher: Matcher | None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # for rows whose params ask for logprobs
    mirostat_mu: list[float | None]  # each row's updated mu (None for rows without Mirostat)


def apply_grammar(logits: torch.Tensor, matchers: list[Matcher]) -> torch.Tensor:
    bitmask = torch.zeros(len(matchers), bitmask_words(logits.shape[-1]), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(bitmask, row)
    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[-1])
    return logits.masked_fill(allowed.logical_not_(), _NEG_INF)


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
    rows = [r for r, b in enumerate(biases) for _ in b]
    cols = [t for b in biases for t in b]
    values = [v for b in biases for v in b.values()]
    bias = torch.tensor(values, dtype=logits.dtype, device=logits.device)
    index = (torch.tensor(rows, dtype=torch.long, device=logits.device),
             torch.tensor(cols, dtype=torch.long, device=logits.device))
    return logits.index_put(index, bias, accumulate=True)


def _padded(token_lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, token_lists)))
    return torch.tensor([t + [pad] * (width - len(t)) for t in token_lists], dtype=torch.long, device=device)


def apply_repetition_penalty(logits: torch.Tensor, token_lists: list[list[int]], penalty: torch.Tensor
                             ) -> torch.Tensor:
    vocab = logits.shape[-1]
    ids = _padded(token_lists, vocab, logits.device)  # the pad lands in a column dropped below
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter_(1, ids, True)[:, :vocab]
    p = penalty.unsqueeze(1)
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def apply_frequency_presence(logits: torch.Tensor, token_lists: list[list[int]], frequency: torch.Tensor,
                             presence: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    ids = _padded(token_lists, vocab, logits.device)
    counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :vocab]
    return logits - counts * frequency.unsqueeze(1) - (counts > 0) * presence.unsqueeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    floor = min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < floor, _NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    k = top_k.clamp(1, vocab)
    kth = logits.topk(int(k.max()), -1).values.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, _NEG_INF)


def _keep_by_mass(logits: torch.Tensor, rank_key: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the tokens ranked first by `rank_key` (largest first) while the probability
    mass before each is still short of the row's `mass`; always at least the first."""
    vocab = logits.shape[-1]
    probs = logits.softmax(-1)
    window = min(_FIRST_WINDOW, vocab)
    while True:
        ids = rank_key.topk(window, -1).indices
        kept = probs.gather(1, ids)
        cumulative = kept.cumsum(-1)
        if window == vocab or bool((cumulative[:, -1] >= mass).all()):
            break
        window = min(window * 4, vocab)
    keep = cumulative - kept < mass.unsqueeze(1)
    keep[:, 0] = True
    out = torch.full_like(logits, _NEG_INF)
    return out.scatter_(1, ids, torch.where(keep, logits.gather(1, ids), _NEG_INF))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return _keep_by_mass(logits, logits, top_p)


def apply_typical_p(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): rank tokens by how close their surprise is to the
    distribution's entropy."""
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)
    return _keep_by_mass(logits, -(logp + entropy).abs(), mass)


def mirostat_filter(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mirostat v2's truncation: keep tokens whose surprise (bits) is at most mu, and the likeliest."""
    logp2 = logits.log_softmax(-1) / math.log(2)
    keep = (-logp2 <= mu.unsqueeze(1)) | (logits == logits.amax(-1, keepdim=True))
    return logits.masked_fill(~keep, _NEG_INF)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row by inverse CDF at a uniform number from each row's generator."""
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    cumulative = probs.cumsum(-1)  # on CPU torch accumulates float32 sums in float64
    target = (u * cumulative[:, -1]).unsqueeze(1)
    return torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


# steps 7-10 of the module docstring: (parameter, whether a value turns the filter on, filter, dtype)
_FILTERS = (
    ("min_p", lambda v: v > 0, apply_min_p, torch.float32),
    ("top_k", lambda v: v > 0, apply_top_k, torch.long),
    ("typical_p", lambda v: v < 1, apply_typical_p, torch.float32),
    ("top_p", lambda v: v < 1, apply_top_p, torch.float32),
)


def _rows(params: list[SamplingParams], wants) -> list[int]:
    return [i for i, p in enumerate(params) if wants(p)]


def _values(params: list[SamplingParams], rows: list[int], name: str, device: torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor([getattr(params[r], name) for r in rows], dtype=dtype, device=device)


def _on_rows(x: torch.Tensor, rows: list[int], fn, *args) -> None:
    """x[rows] = fn(x[rows], *args), skipping the copies when every row is in."""
    if not rows:
        return
    if len(rows) == x.shape[0]:
        x.copy_(fn(x, *args))
        return
    index = torch.tensor(rows, device=x.device)
    x[index] = fn(x[index], *args)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[TokenLogprob | None]:
    rows = _rows(params, lambda p: p.logprobs is not None)
    out: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logp = logits[index].log_softmax(-1)
    chosen = logp.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
    k = max(params[r].logprobs for r in rows)
    top_values, top_ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    ids = tokens[index].tolist()
    for i, r in enumerate(rows):
        n = params[r].logprobs
        out[r] = TokenLogprob(ids[i], chosen[i], list(zip(top_ids[i][:n], top_values[i][:n], strict=True)))
    return out


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Logprobs of `targets` (the token after each position) under each row of `logits`."""
    logp = logits.log_softmax(-1)
    target = torch.tensor(targets, device=logits.device)
    chosen = logp.gather(1, target.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    return [TokenLogprob(t, c, list(zip(i, v, strict=True)))
            for t, c, i, v in zip(targets, chosen, top_ids.tolist(), top_values.tolist(), strict=True)]


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """One token per row of `logits` ([B, V] float32), each from its own row's distribution."""
    params = [r.params for r in rows]
    device = logits.device
    x = logits
    constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
    biased = _rows(params, lambda p: bool(p.logit_bias))
    repeat = _rows(params, lambda p: p.repetition_penalty != 1)
    penal = _rows(params, lambda p: p.frequency_penalty != 0 or p.presence_penalty != 0)
    if constrained or biased or repeat or penal:
        x = logits.clone()
        _on_rows(x, constrained, apply_grammar, [rows[r].matcher for r in constrained])
        _on_rows(x, biased, apply_logit_bias, [params[r].logit_bias for r in biased])
        _on_rows(x, repeat, apply_repetition_penalty, [rows[r].token_ids for r in repeat],
                 _values(params, repeat, "repetition_penalty", device))
        _on_rows(x, penal, apply_frequency_presence,
                 [rows[r].token_ids[rows[r].num_prompt_tokens:] for r in penal],
                 _values(params, penal, "frequency_penalty", device),
                 _values(params, penal, "presence_penalty", device))
    mu: list[float | None] = [r.mirostat_mu for r in rows]
    random_rows = _rows(params, lambda p: not p.greedy)
    # greedy rows' tokens; random rows' entries are overwritten below
    tokens = x.argmax(-1) if len(random_rows) < len(rows) else torch.empty(len(rows), dtype=torch.long, device=device)
    if random_rows:
        index = torch.tensor(random_rows, device=device)
        sub = [params[r] for r in random_rows]
        y = x[index] / _values(params, random_rows, "temperature", device).unsqueeze(1)
        miro = _rows(sub, lambda p: p.mirostat_target is not None)
        _on_rows(y, miro, mirostat_filter,
                 torch.tensor([mu[random_rows[i]] for i in miro], dtype=torch.float32, device=device))
        for name, active, apply, dtype in _FILTERS:
            chosen = _rows(sub, lambda p, name=name, active=active:
                           p.mirostat_target is None and active(getattr(p, name)))
            _on_rows(y, chosen, apply, _values(sub, chosen, name, device, dtype))
        probs = y.softmax(-1)
        drawn = draw(probs, [rows[r].generator for r in random_rows])
        tokens[index] = drawn
        if miro:
            chosen = probs[miro].gather(1, drawn[miro].unsqueeze(1)).squeeze(1)
            surprise = (-chosen.log2()).tolist()
            for i, s in zip(miro, surprise, strict=True):
                p = sub[i]
                mu[random_rows[i]] = mu[random_rows[i]] - p.mirostat_lr * (s - p.mirostat_target)
    return SamplerOutput(tokens.tolist(), _logprobs(logits, tokens, params), mu)
