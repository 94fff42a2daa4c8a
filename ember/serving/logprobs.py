"""Tokens as the client sees them: where each token's text starts in a choice's text, and the two
Fireworks logprob formats.

The numbers are the engine's: the log-softmax of the model's raw logits at that position, before
logit_bias, penalties, temperature and the filters (vLLM's default), so they describe the model,
not the sampling settings. A token's `text_offset` is the length of the choice's text before the
token's own text; a token whose bytes only complete a character together with the next one starts
where that character starts. The first prompt token has no logprob (nothing precedes it): null.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.engine.request import TokenLogprob
from ember.models.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TokenOut:
    token_id: int
    offset: int  # where the token's text starts in its choice's text
    logprob: TokenLogprob | None  # None when not asked for, and for the first prompt token
    prompt: bool = False  # an echoed prompt token, not a generated one


def _ends_mid_character(data: bytes) -> bool:
    """Whether `data` ends inside a UTF-8 sequence: a lead byte still short of continuation bytes."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last sequence's lead byte
            size = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return size > back
    return False


class OffsetDetokenizer:
    """An IncrementalDetokenizer that also reports where each token's text starts. Text that ends
    inside a character (max_tokens cut it) ends before that character, not in U+FFFD."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, prefix_ids: Sequence[int] = (),
                 start: int = 0) -> None:
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, prefix_ids)
        self._held: list[int] = []  # ids whose text the detokenizer has not released yet
        self.length = start  # text emitted so far, `start` included

    def add(self, token_ids: Sequence[int]) -> tuple[str, list[int]]:
        """(new text, the offset of each token): one token at a time, so each gets its own offset."""
        text, offsets = "", []
        for t in token_ids:
            offsets.append(self.length + len(text))
            new = self._detok.add([t])
            if new:
                self._held.clear()
            else:
                self._held.append(t)
            text += new
        self.length += len(text)
        return text, offsets

    def flush(self) -> str:
        text = self._detok.flush()
        special = self._tokenizer.special_ids
        held = b"".join(self._tokenizer.token_bytes(t) for t in self._held if t not in special)
        if text.endswith("\ufffd") and _ends_mid_character(held):
            text = text[:-1]
        self._held.clear()
        self.length += len(text)
        return text


def text_with_offsets(tokenizer: Tokenizer, token_ids: Sequence[int], skip_special_tokens: bool,
                      prefix_ids: Sequence[int] = ()) -> tuple[str, list[int]]:
    """The whole text of `token_ids` (after `prefix_ids` as left context) and each token's offset."""
    detok = OffsetDetokenizer(tokenizer, skip_special_tokens, prefix_ids)
    text, offsets = detok.add(token_ids)
    return text + detok.flush(), offsets


class LogprobFormatter:
    """Token records → OpenAI's `{"content": [...]}` (logprobs: true) or the legacy `{tokens,
    token_logprobs, top_logprobs, text_offset, token_ids}` (logprobs: <int>)."""

    def __init__(self, tokenizer: Tokenizer, legacy: bool) -> None:
        self.tokenizer = tokenizer
        self.legacy = legacy

    def token(self, token_id: int) -> str:
        """A token's own text; bytes that are part of a character come out as U+FFFD."""
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def format(self, tokens: Sequence[TokenOut]) -> dict:
        return self._legacy(tokens) if self.legacy else self.openai(tokens)

    def openai(self, tokens: Sequence[TokenOut]) -> dict:
        return {"content": [self._entry(t) for t in tokens]}

    def _alternative(self, token_id: int, logprob: float) -> dict:
        return {"token": self.token(token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token_id)), "token_id": token_id}

    def _entry(self, t: TokenOut) -> dict:
        lp = t.logprob
        return {**self._alternative(t.token_id, lp.logprob if lp else None), "text_offset": t.offset,
                "top_logprobs": [self._alternative(i, v) for i, v in lp.top] if lp else []}

    def _legacy(self, tokens: Sequence[TokenOut]) -> dict:
        """top_logprobs per position: the k likeliest and the chosen token (so k or k + 1 entries)."""
        tops: list[dict[str, float] | None] = []
        for t in tokens:
            lp = t.logprob
            if lp is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for i, v in (*lp.top, (t.token_id, lp.logprob)):
                top.setdefault(self.token(i), v)  # two ids of one spelling: the likelier is listed
            tops.append(top)
        return {"tokens": [self.token(t.token_id) for t in tokens],
                "token_logprobs": [t.logprob.logprob if t.logprob else None for t in tokens],
                "top_logprobs": tops, "text_offset": [t.offset for t in tokens],
                "token_ids": [t.token_id for t in tokens]}
