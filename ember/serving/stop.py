"""Stop strings over streamed text: the stop word stays in the output and nothing after it leaks."""

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
        hits = [(i + len(s)) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
