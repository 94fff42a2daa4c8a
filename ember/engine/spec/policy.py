"""How many drafts each sequence gets in a step: as many as pay for themselves.

Verifying a draft costs one more query position in the step; it pays when the chance that it is
accepted (the sequence's per-draft acceptance rate to the power of its place in the run) exceeds the
extra position's cost relative to the tokens the step yields anyway. With B decodes in a step of T
query positions costing t(T) seconds, a draft at place j is worth it while

    acceptance ** j  >=  B * t'(T) / t(T)

where t' is the cost of one more position, both taken from a line fitted to the engine's own recent
step times. A lone stream on a CPU (one step's cost mostly reading the weights) drafts freely; a large
batch (every position already paying its own arithmetic) drafts only for sequences that almost always
accept, and with enough of them not at all. A sequence whose acceptance falls below its bar stops
drafting and probes again after a cool-down that doubles each time it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ember.engine.request import SpecStats
from ember.engine.spec.ngram import lookup
from ember.engine.spec.prediction import PredictionCursor

MAX_DRAFTS_PREDICTION = 16  # a prediction is usually right for long runs
MAX_DRAFTS_LOOKUP = 8
_PRIOR_PREDICTION = 0.9  # acceptance assumed before a sequence has verified anything
_PRIOR_LOOKUP = 0.5
_MEMORY = 0.8  # weight of the past in the per-sequence acceptance estimate, per verification
_COOLDOWN_STEPS = 8


class StepCost:
    """Forward-pass seconds as a line in query positions, fitted with exponential forgetting; until the
    steps seen vary enough, the marginal position is assumed to cost a tenth of a one-position step
    (a small model on a CPU measured 0.7 ms against 7.4 ms)."""

    def __init__(self, memory: float = 0.98) -> None:
        self.memory = memory
        self.sums = np.zeros(5)  # weight, T, T^2, t, T*t

    def observe(self, tokens: int, seconds: float) -> None:
        self.sums = self.sums * self.memory + np.array([1.0, tokens, tokens * tokens, seconds, tokens * seconds])

    def marginal_ratio(self, tokens: int) -> float:
        """t'(T) / t(T): the cost of one more position relative to the whole step."""
        w, x, xx, y, xy = self.sums
        if w == 0:
            return 0.1 / (1 + 0.1 * (tokens - 1))
        mean_x, mean_y = x / w, y / w
        var = xx / w - mean_x * mean_x
        slope = (xy / w - mean_x * mean_y) / var if var > 1.0 else 0.1 * mean_y / (1 + 0.1 * (mean_x - 1))
        slope = max(slope, 1e-9)
        intercept = max(mean_y - slope * mean_x, slope)
        return slope / (intercept + slope * tokens)


@dataclass
class _Source:
    """One proposer's record with one sequence."""

    acceptance: float  # estimated chance that a draft is accepted, given the one before it was
    cooldown: int = 0  # steps to skip it
    failures: int = 0  # consecutive times its acceptance fell below the bar

    def worth(self, bar: float, limit: int) -> int:
        """How many drafts from it pay now (acceptance ** j >= bar), cooling it down when none do."""
        if self.cooldown:
            self.cooldown -= 1
            return 0
        if self.acceptance < bar:
            self.failures += 1
            self.cooldown = _COOLDOWN_STEPS << min(self.failures, 6)
            self.acceptance = max(self.acceptance, bar)  # the probe after the cool-down gets its chance
            return 0
        if self.acceptance >= 1 or bar <= 0:
            return limit
        return min(limit, int(np.log(bar) / np.log(self.acceptance)))

    def verified(self, proposed: int, accepted: int) -> None:
        trials = accepted + (accepted < proposed)
        self.acceptance = _MEMORY * self.acceptance + (1 - _MEMORY) * accepted / trials
        if accepted:
            self.failures = 0


@dataclass
class DraftState:
    """One sequence's speculation: its proposers (the prediction's cursor, prompt lookup), their records,
    and its counts. Each step the proposer with the better record that pays and has drafts gives them."""

    cursor: PredictionCursor | None
    lookup: _Source | None  # None: prompt lookup not allowed
    prediction: _Source | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    source: _Source | None = None  # where the drafts under verification came from

    def drafts(self, context: list[int], num_prompt: int, limit: int, bar: float) -> list[int]:
        """Drafts worth verifying now (at most `limit`), or none."""
        self.source = None
        for source in sorted(filter(None, (self.prediction, self.lookup)), key=lambda s: -s.acceptance):
            if source is self.prediction:
                found = self.cursor.propose(context[num_prompt:], source.worth(bar, min(limit, MAX_DRAFTS_PREDICTION)))
            else:
                k = source.worth(bar, min(limit, MAX_DRAFTS_LOOKUP))
                found = lookup(np.asarray(context, dtype=np.int64), k) if k else []
            if found:
                self.source = source
                return found
        return []

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
        """Every output token, in order: the prediction's cursor follows them."""
        if self.cursor is not None:
            self.cursor.observe(token)


def new_draft_state(prediction: list[int] | None, lookup_allowed: bool) -> DraftState | None:
    if not prediction and not lookup_allowed:
        return None
    state = DraftState(cursor=PredictionCursor(prediction) if prediction else None,
                       lookup=_Source(_PRIOR_LOOKUP) if lookup_allowed else None,
                       prediction=_Source(_PRIOR_PREDICTION) if prediction else None)
    state.stats.prediction_tokens = len(prediction or [])
    return state
