"""Stop strings over streamed text: the stop word stays in the output (Fireworks) and nothing after
it ever reaches the client, even mid-stream."""

from __future__ import annotations


class StopMatcher:
    """Feeds text through, holding back only a tail that could still grow into a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string ended it)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        ends = [i + len(s) for s in self.stops if (i := buf.find(s)) >= 0]
        if ends:
            self.pending = ""
            return buf[:min(ends)], True
        keep = max((self._partial(buf, s) for s in self.stops), default=0)
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of `stop`."""
        return next((k for k in range(min(len(stop) - 1, len(buf)), 0, -1) if buf.endswith(stop[:k])), 0)

    def flush(self) -> str:
        """The held-back tail, once the sequence ended without completing a stop string."""
        out, self.pending = self.pending, ""
        return out
