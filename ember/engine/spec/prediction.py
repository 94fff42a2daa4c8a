"""Predicted outputs: drafts are the prediction's continuation from where the output last matched it."""

from __future__ import annotations

import numpy as np

from ember.engine.spec.ngram import suffix_matches

_RESYNC_MAX_N = 8  # longest output suffix looked for in the prediction after a divergence


class PredictionCursor:
    """Follows the output through the prediction. While every token matched, the next draft starts at the
    cursor. After a divergence (an edit) the output's longest recent suffix is found again in the
    prediction, the occurrence nearest the cursor winning, so the unchanged text after an edit is
    drafted again; a single token only resynchronises forward, where the edited span ends."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = np.array(tokens, dtype=np.int64)
        self.pos = 0  # the prediction's index expected to be the next output token
        self.synced = True

    def observe(self, token: int) -> None:
        if self.synced and self.pos < len(self.tokens) and self.tokens[self.pos] == token:
            self.pos += 1
        else:
            self.synced = False

    def propose(self, output: list[int], k: int) -> list[int]:
        if not self.synced and not self._resync(output):
            return []
        return self.tokens[self.pos:self.pos + k].tolist()

    def _resync(self, output: list[int]) -> bool:
        tail = np.array(output[-_RESYNC_MAX_N:], dtype=np.int64)
        for n in range(len(tail), 0, -1):
            ends = suffix_matches(self.tokens, tail[len(tail) - n:]) + n
            if n == 1:
                ends = ends[ends > self.pos]
            if ends.size:
                self.pos = int(ends[np.abs(ends - self.pos).argmin()])
                self.synced = True
                return True
        return False
