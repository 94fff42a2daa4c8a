"""A sequence's life inside the engine: its tokens, its KV blocks and how far they are computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ember.engine.request import RequestTimings, SamplingParams, TokenLogprob
from ember.engine.spec.policy import DraftState
from ember.structured.backend import Matcher


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None  # per-sequence RNG: same seed, same draws, any batch
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    window_tables: list[list[int]] = field(default_factory=list)  # a sliding-window model's other layer groups
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # chained SHA-256 digest per full block
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    admitted: bool = False
    index: int = 0  # which of its request's n samples
    pending_forks: int = 0  # samples still to split off this one once its prompt is computed
    mirostat_mu: float | None = None  # Mirostat's running surprise bound
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled while the prompt is computed
    prompt_logprobs_sent: bool = False
    matcher: Matcher | None = None  # this sample's place in params.grammar
    timings: RequestTimings = field(default_factory=lambda: RequestTimings(time.perf_counter()))
    drafting: DraftState | None = None  # its speculative decoding, when it may speculate

    def __post_init__(self) -> None:
        if self.params.mirostat_target is not None and self.mirostat_mu is None:
            self.mirostat_mu = 2 * self.params.mirostat_target  # Mirostat's own initialisation
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * self.num_prompt_tokens
        if self.params.grammar is not None and self.matcher is None:
            self.matcher = self.params.grammar.matcher()

    @property
    def key(self) -> tuple[str, int]:
        return self.request_id, self.index

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's own tokens still need logprobs (so its KV must be computed, not cached)."""
        return self.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
