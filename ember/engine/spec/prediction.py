"""Predicted outputs: drafts are the prediction's continuation from where the output last matched it."""

from __future__ import annotations

import numpy as np

from ember.engine.spec.ngram import suffix_matches

_RESYNC_MAX_N = 8  # longest output suffix looked for in the prediction after a divergence
_SKIP_AHEAD = 16  # a single token re-finds its place only this close after the cursor (a substitution)


class PredictionCursor:
    """Follows the output through the prediction. While every token matches, the next draft starts at the
    cursor. After a divergence (an edit) the output's longest recent suffix (two tokens or more) is
    found again in the prediction, the occurrence nearest the cursor winning; a single token only counts
    just ahead of the cursor, where a substituted span ends. A place found again is a guess until tokens
    confirm it: it drafts 2 tokens and 2 more for each token confirmed (the n - 1 tokens of the suffix
    found count), so a wrong guess (the output past the prediction's end, text the prediction never had)
    costs little."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = np.array(tokens, dtype=np.int64)
        self.pos = 0  # the prediction's index expected to be the next output token
        self.synced = True
        self.confirmed = 0  # tokens matched since the place was (re)found

    def observe(self, token: int) -> None:
        if self.synced and self.pos < len(self.tokens) and self.tokens[self.pos] == token:
            self.pos += 1
            self.confirmed += 1
        else:
            self.synced = False

    def propose(self, output: list[int], k: int) -> list[int]:
        if not self.synced and not self._resync(output):
            return []
        return self.tokens[self.pos:self.pos + min(k, 2 + 2 * self.confirmed)].tolist()

    def _resync(self, output: list[int]) -> bool:
        tail = np.array(output[-_RESYNC_MAX_N:], dtype=np.int64)
        for n in range(len(tail), 0, -1):
            ends = suffix_matches(self.tokens, tail[len(tail) - n:]) + n
            if n == 1:
                ends = ends[(ends > self.pos) & (ends <= self.pos + _SKIP_AHEAD)]
            if ends.size:
                self.pos = int(ends[np.abs(ends - self.pos).argmin()])
                self.synced, self.confirmed = True, n - 1  # the suffix found is evidence too
                return True
        return False
