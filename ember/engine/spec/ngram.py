"""Prompt lookup (vLLM's n-gram proposer): text that repeats its context is drafted from the context."""

from __future__ import annotations

import numpy as np


def suffix_matches(haystack: np.ndarray, suffix: np.ndarray) -> np.ndarray:
    """Start indices j where haystack[j:j + len(suffix)] == suffix."""
    n = len(suffix)
    if n == 0 or len(haystack) < n:
        return np.empty(0, dtype=np.int64)
    hits = np.flatnonzero(haystack[:len(haystack) - n + 1] == suffix[0])
    for d in range(1, n):
        hits = hits[haystack[hits + d] == suffix[d]]
    return hits


def lookup(context: np.ndarray, k: int, min_n: int = 2, max_n: int = 4) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the context's longest suffix
    (of min_n..max_n tokens) that occurred before; none without such an occurrence."""
    size = len(context)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        hits = suffix_matches(context[:size - 1], context[size - n:])  # an occurrence that has a successor
        if hits.size:
            start = int(hits[-1]) + n
            return context[start:start + k].tolist()
    return []
