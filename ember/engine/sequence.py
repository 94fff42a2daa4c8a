"""A sequence's life inside the engine: its tokens, its KV blocks and how far they are computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ember.engine.request import SamplingParams


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
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[tuple[int, tuple]] = field(default_factory=list)  # (chained hash, key) per full block
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    admitted: bool = False
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
