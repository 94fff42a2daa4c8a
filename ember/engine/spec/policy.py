"""How many drafts each sequence gets in a step: as many as pay for themselves.

Drafts are the last thing a step takes: the decodes, prefill chunks and admissions are scheduled first,
and drafts fill what is left of the token budget and the free blocks, so they never delay a prompt or
preempt anyone. Draft j of a sequence yields a token with probability acceptance ** j (its proposer's
recent per-draft acceptance); it costs the step one more query position. `allocate` takes drafts best
first while they raise the step's tokens per second, reading costs from `StepCost`, a table of
forward-pass times measured on this machine at start-up. A lone stream on a CPU (a step's cost mostly
reading the weights) drafts freely; a large batch (every position already paying its own arithmetic)
drafts only for sequences that almost always accept, and with enough of them not at all. A proposal
that is not verified is still checked against the tokens that come (a shadow), so every proposer's
acceptance stays current without costing the model anything: one that fell below the bar where even
its first draft could pay comes back as soon as its shadows say the text has turned repetitive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ember.engine.request import SpecStats
from ember.engine.spec.ngram import lookup
from ember.engine.spec.prediction import PredictionCursor

MAX_DRAFTS = 16  # per sequence and step; the allocation decides how many of them pay
_PRIOR_PREDICTION = 0.9  # acceptance assumed before a sequence has verified anything
_PRIOR_LOOKUP = 0.5
_MEMORY = 0.8  # weight of the past in the per-sequence acceptance estimate, per verification
_PRIOR_MEMORY = 0.95  # the same for the estimate across sequences
_PRIOR_WEIGHT = 4.0  # verifications' worth of the prior in a sequence's estimate (shrinks early luck)
_MARGIN = 0.05  # how much faster (tokens per second) a step must be expected to be to draft at all
_COOLDOWN_STEPS = 8
_CHEAPEST_OVER = 32  # draft positions over which the cheapest average cost of one is sought
_SHADOW_TOKENS = 4  # of a proposal not verified, checked against the output (settled within 4 tokens)


class StepCost:
    """What a step costs by its query positions T, in seconds.

    The shape comes from start-up (`calibrate`: a forward pass and a greedy verification for a grid of T,
    read through its running maximum, since more positions never cost less whatever one measurement's
    noise says), the level from the steps that run (`observe`: attention over long contexts, sampling at a
    temperature). Drafts are priced by the shape: t(T) measured, plus the calibrated difference between
    T + D and T positions. Products run in tiles of rows, so the shape is far from a line: on a Sapphire
    Rapids core pair SmolLM2-135M measured 19.7 ms at T = 16 and 24.4 ms at T = 17."""

    GRID = (1, 2, 4, 8, 9, 12, 16, 17, 24, 32, 33, 48, 64)  # past it, along its last two points
    _MEMORY = 0.9  # weight of the past in a measured step time, per step that runs at that T

    def __init__(self) -> None:
        self.measured: dict[int, float] = {}  # steps as they ran
        # the calibrated curve (T, running maximum of seconds); until calibrated a lone decode mostly reads weights
        self._xs, self._ys = np.array([1.0, 2.0]), np.array([1.0, 1.1])
        self._table: list[float] = []  # the curve at T = 0, 1, ...: read on every step, computed once

    def calibrate(self, run: Callable[[int], float], max_tokens: int) -> None:
        """`run(T)` times one step of T query positions, for the grid up to max_tokens: the faster of two
        runs (a busy machine's hiccup is not the shape), after one untimed pass that pages weights in.
        The curve is tabulated up to the largest step a draft allocation can ask about."""
        run(1)
        grid = [t for t in self.GRID if t <= max_tokens]
        self._xs = np.array(grid, dtype=np.float64)
        self._ys = np.maximum.accumulate([min(run(t), run(t)) for t in grid])
        self._table = self._curve(np.arange(max_tokens + _CHEAPEST_OVER + 1)).tolist()

    def observe(self, tokens: int, seconds: float) -> None:
        old = self.measured.get(tokens)
        self.measured[tokens] = seconds if old is None else self._MEMORY * old + (1 - self._MEMORY) * seconds

    def _curve(self, tokens: np.ndarray) -> np.ndarray:
        """Interpolated within the grid, along its last two points past it."""
        xs, ys = self._xs, self._ys
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        return np.where(tokens <= xs[-1], np.interp(tokens, xs, ys), ys[-1] + slope * (tokens - xs[-1]))

    def calibrated(self, tokens: int) -> float:
        if tokens < len(self._table):
            return self._table[tokens]
        return float(self._curve(np.array(tokens)))

    def cheapest_draft(self, tokens: int) -> float:
        """The least a draft position costs on average, over adding 1 to _CHEAPEST_OVER of them to a step."""
        base = self.calibrated(tokens)
        return min((self.calibrated(tokens + d) - base) / d for d in range(1, _CHEAPEST_OVER + 1))

    def seconds(self, tokens: int, drafts: int = 0) -> float:
        """A step of `tokens` positions, plus `drafts` more."""
        base = self.measured.get(tokens) or self.calibrated(tokens)
        return base + (self.calibrated(tokens + drafts) - self.calibrated(tokens) if drafts else 0.0)


def allocate(proposals: list[tuple[float, int]], tokens: int, sampled: int, cost: StepCost) -> list[int]:
    """How many of each sequence's proposed drafts to verify, given (acceptance, drafts proposed) per
    sequence, a step of `tokens` query positions that yields `sampled` tokens without drafts, and its cost.

    Draft j of a sequence yields a token with probability acceptance ** j, so drafts are taken best
    first, and the step keeps the number that maximises tokens per second: (sampled + expected accepted)
    / t(tokens, drafts), if that beats the step without drafts by _MARGIN (estimates are noisy; a
    marginal gain is not worth the risk). Costs come in steps (row tiles), so the best count is searched,
    not stopped at the first draft that does not pay."""
    candidates = sorted(((acceptance ** j, s) for s, (acceptance, n) in enumerate(proposals)
                         for j in range(1, n + 1)), reverse=True)
    best_rate, best, gain = sampled / cost.seconds(tokens) * (1 + _MARGIN), 0, 0.0
    for n, (value, _) in enumerate(candidates, start=1):
        gain += value
        rate = (sampled + gain) / cost.seconds(tokens, n)
        if rate > best_rate:
            best_rate, best = rate, n
    counts = [0] * len(proposals)
    for _, s in candidates[:best]:
        counts[s] += 1
    return counts


@dataclass
class DraftPriors:
    """Where a new sequence's acceptance estimate starts. Prompt lookup's follows its acceptance over every
    sequence lately (a workload whose lookups mostly fail stops drafting from its first steps); a
    prediction's stays optimistic, since each request brings its own: a wrong one shows in a few steps,
    and a cursor that lost its place drafts little until tokens confirm the new one."""

    prediction: float = _PRIOR_PREDICTION
    lookup: float = _PRIOR_LOOKUP

    def record(self, kind: str, observed: float) -> None:
        if kind == "lookup":
            self.lookup = _PRIOR_MEMORY * self.lookup + (1 - _PRIOR_MEMORY) * observed


@dataclass
class _Source:
    """One proposer's record with one sequence."""

    kind: str  # "prediction" or "lookup"
    priors: DraftPriors
    hits: float = 0.0  # accepted drafts, decayed by _MEMORY per verification
    trials: float = 0.0  # drafts that were verified (to the first rejection), decayed alike
    cooldown: int = 0  # steps before it proposes again

    @property
    def acceptance(self) -> float:
        """Estimated chance that a draft is accepted, given the one before it was: its record, shrunk
        toward the proposer's acceptance across sequences while the record is short."""
        prior = getattr(self.priors, self.kind)
        return (self.hits + _PRIOR_WEIGHT * prior) / (self.trials + _PRIOR_WEIGHT)

    def worth(self, bar: float, limit: int) -> int:
        """How many drafts pay now: acceptance ** j >= bar."""
        if self.acceptance >= 1 or bar <= 0:
            return limit
        return max(0, min(limit, int(np.log(bar) / np.log(self.acceptance))))

    def verified(self, proposed: int, accepted: int) -> None:
        trials = accepted + (accepted < proposed)
        self.hits = _MEMORY * self.hits + accepted
        self.trials = _MEMORY * self.trials + trials
        self.priors.record(self.kind, accepted / trials)


@dataclass
class _Shadow:
    """A proposal that was not verified, checked against the tokens that came instead: a proposer keeps an
    honest record while it is not trusted (or not needed), at no cost to the model."""

    source: _Source
    tokens: list[int]
    matched: int = 0

    def follows(self, token: int) -> bool:
        """Take the next output token; False once the proposal is settled (and recorded)."""
        if token == self.tokens[self.matched]:
            self.matched += 1
            if self.matched < len(self.tokens):
                return True
        self.source.verified(len(self.tokens), self.matched)
        return False


@dataclass
class DraftState:
    """One sequence's speculation: its proposers (the prediction's cursor, prompt lookup), their records,
    and its counts. Each step every proposer proposes; the one whose drafts promise more accepted tokens
    (if its acceptance clears the bar) gives them, and the others' proposals are shadows. A proposer whose
    acceptance is under the bar proposes only every _COOLDOWN_STEPS steps, as a shadow."""

    cursor: PredictionCursor | None
    lookup: _Source | None  # None: prompt lookup not allowed
    prediction: _Source | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    source: _Source | None = None  # where the drafts under verification came from
    shadows: list[_Shadow] = field(default_factory=list)
    max_drafts: int = MAX_DRAFTS  # per step (Fireworks' draftTokenCount)
    ngram: int = 4  # the longest context suffix prompt lookup matches (Fireworks' ngramSpeculationLength)

    def drafts(self, context: list[int], num_prompt: int, limit: int, bar: float) -> list[int]:
        """Drafts worth verifying now (at most `limit`), or none."""
        self.source, best, gain = None, [], 0.0
        for source in filter(None, (self.prediction, self.lookup)):
            if source.cooldown:
                source.cooldown -= 1
                continue
            if any(shadow.source is source for shadow in self.shadows):
                continue  # its last proposal is still being checked
            k = min(limit, self.max_drafts)
            found = self.cursor.propose(context[num_prompt:], k) if source is self.prediction \
                else lookup(np.asarray(context, dtype=np.int64), k, min(2, self.ngram), self.ngram)
            if not found:
                continue
            self.shadows.append(_Shadow(source, found[:_SHADOW_TOKENS]))
            if source.acceptance < bar:
                source.cooldown = _COOLDOWN_STEPS
                continue
            found = found[:source.worth(bar, len(found))]
            expected = sum(source.acceptance ** j for j in range(1, len(found) + 1))
            if expected > gain:
                self.source, best, gain = source, found, expected
        return best

    def using(self, count: int) -> None:
        """The allocation's verdict on the drafts offered: `count` of them are verified this step."""
        if count:
            self.shadows = [shadow for shadow in self.shadows if shadow.source is not self.source]
        else:
            self.source = None

    def acceptance(self) -> float:
        """The estimated acceptance of the drafts offered."""
        return self.source.acceptance if self.source is not None else 0.0

    def verified(self, proposed: int, accepted: int) -> None:
        """Record a verification: `accepted` of `proposed` drafts kept."""
        s = self.stats
        s.proposed += proposed
        s.accepted += accepted
        if self.source is self.prediction:
            s.prediction_accepted += accepted
            s.prediction_rejected += proposed - accepted
        for j in range(proposed):
            if j == len(s.position_totals):
                s.position_totals.append(0)
                s.position_hits.append(0)
            s.position_totals[j] += 1
            s.position_hits[j] += j < accepted
        self.source.verified(proposed, accepted)

    def observe(self, token: int) -> None:
        """Every output token, in order: the prediction's cursor and the shadows follow them."""
        if self.cursor is not None:
            self.cursor.observe(token)
        if self.shadows:
            self.shadows = [shadow for shadow in self.shadows if shadow.follows(token)]


def new_draft_state(prediction: list[int] | None, lookup_allowed: bool, priors: DraftPriors,
                    max_drafts: int = MAX_DRAFTS, ngram: int = 4) -> DraftState | None:
    if not prediction and not lookup_allowed:
        return None
    state = DraftState(cursor=PredictionCursor(prediction) if prediction else None,
                       lookup=_Source("lookup", priors) if lookup_allowed else None,
                       prediction=_Source("prediction", priors) if prediction else None,
                       max_drafts=max_drafts, ngram=ngram)
    state.stats.prediction_tokens = len(prediction or [])
    return state
