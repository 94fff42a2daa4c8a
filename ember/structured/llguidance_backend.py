"""The llguidance backend: JSON schemas, Lark and GBNF grammars and regexes, compiled by the Rust
library (no torch.compile, no GPU needed); masks cost ~1 ms per row."""

from __future__ import annotations

import json
from collections import OrderedDict
from threading import Lock

import llguidance as llg
import torch
from llguidance.gbnf_to_lark import any_to_lark

from ember.models.tokenizer import Tokenizer
from ember.structured.backend import GrammarError, GrammarSpec

# JSON as json.dumps writes it by default: ", " and ": " are what models have seen most
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256


class LLGuidanceMatcher:
    def __init__(self, matcher: llg.LLMatcher) -> None:
        self._m = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token_id: int) -> bool:
        return self._m.consume_token(token_id)

    def validate(self, token_ids: list[int]) -> int:
        return self._m.validate_tokens(token_ids)

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()


class LLGuidanceGrammar:
    def __init__(self, text: str, pristine: llg.LLMatcher) -> None:
        self.text = text
        self._pristine = pristine

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._pristine.deep_copy())


class LLGuidanceBackend:
    """One per model (the token vocabulary is baked into every compiled grammar)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos_token_ids)
        self._cache: OrderedDict[GrammarSpec, LLGuidanceGrammar] = OrderedDict()
        self._lock = Lock()  # compile from the event loop or worker threads alike

    def _grammar_text(self, spec: GrammarSpec) -> str:
        try:
            if spec.kind == "json_schema":
                return llg.LLMatcher.grammar_from_json_schema(spec.source, overrides=_JSON_OPTIONS)
            if spec.kind == "regex":
                return llg.LLMatcher.grammar_from_regex(spec.source)
            lark = any_to_lark(spec.source) if spec.kind == "gbnf" else spec.source
            return llg.LLMatcher.grammar_from_lark(lark)
        except (ValueError, json.JSONDecodeError) as exc:
            raise GrammarError(str(exc)) from exc
        except Exception as exc:  # the GBNF converter raises its own error types
            raise GrammarError(f"invalid {spec.kind} grammar: {exc}") from exc

    def compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        text = self._grammar_text(spec)
        matcher = llg.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        grammar = LLGuidanceGrammar(text, matcher)
        with self._lock:
            self._cache[spec] = grammar
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar
