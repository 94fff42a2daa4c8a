"""Per-request parameters and the events the engine streams back."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """What one sequence asks of the sampler and the stopping rules the engine enforces.

    Stop *strings* are not here: they need text, so the serving layer applies them and aborts.
    """

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or less means off
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepOutput:
    """New tokens for one sequence from one engine step (possibly several, never zero unless finished)."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS / stop token), "length", "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
