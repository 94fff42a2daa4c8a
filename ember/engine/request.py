"""Per-request parameters and the events the engine streams back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.structured.backend import Grammar

MAX_LOGPROBS = 20  # top alternatives per position the engine will compute


@dataclass
class SamplingParams:
    """What one request asks of the sampler and the stopping rules the engine enforces.

    Stop *strings* are not here: they need text, so the serving layer applies them and aborts.
    The sampler's module docstring gives the order in which these apply.
    """

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or less means off
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # transformers': over prompt and output tokens, multiplicative
    frequency_penalty: float = 0.0  # OpenAI's: over output tokens, per occurrence
    presence_penalty: float = 0.0  # OpenAI's: over output tokens, once
    logit_bias: dict[int, float] = field(default_factory=dict)
    mirostat_target: float | None = None  # tau in bits; set = Mirostat v2 replaces min/top/typical filters
    mirostat_lr: float = 0.1  # eta
    seed: int | None = None  # sample i of n uses seed + i
    n: int = 1  # samples sharing one prefill of the prompt
    max_tokens: int = 16  # 0: compute the prompt (and its logprobs) only, generate nothing
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: each new token's logprob and the k likeliest
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    grammar: Grammar | None = None  # constrains every sample; it ends when the grammar is complete
    cache_salt: str | None = None  # prefix-cache namespace (prompt_cache_isolation_key): shared only within it
    prompt_cache_max_len: int | None = None  # at most this many prompt tokens read from or stored in the cache
    # predicted outputs: the tokens the output is expected to repeat; drafts are taken from it (re-found after
    # a divergence), and the output is exactly what it would be without it
    prediction: list[int] | None = None
    speculate: bool = True  # False: no prompt-lookup drafts for this request (a prediction still drafts)
    # scheduling class, lower first (vLLM's convention): live traffic 0, batch-job lines 1, service_tier
    # "priority" -1; a step prefilling one class carries no work of a worse one, which yields to it
    priority: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class TokenLogprob:
    """log-softmax of the model's raw logits (before penalties, bias, temperature and filters)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, most likely first


@dataclass
class RequestTimings:
    """When a sample went through the engine's phases (time.perf_counter()), for perf metrics: waiting for
    its first schedule, prefill up to its first token, then generation until it finished."""

    arrival: float
    scheduled: float | None = None  # first scheduled into a step
    first_token: float | None = None
    finished: float | None = None


@dataclass
class SpecStats:
    """One sample's speculative decoding so far (cumulative), for usage and Fireworks' perf metrics."""

    prediction_tokens: int = 0  # tokens in the request's prediction (after the max_tokens cap)
    proposed: int = 0  # draft tokens verified, from any proposer
    accepted: int = 0  # of those, kept in the output
    prediction_accepted: int = 0  # accepted drafts that came from the prediction
    prediction_rejected: int = 0  # drafts from the prediction that were verified and rejected
    position_hits: list[int] = field(default_factory=list)  # per draft position (0 = first draft of a step)
    position_totals: list[int] = field(default_factory=list)

    def acceptance(self) -> str:
        """Fireworks' `speculation-acceptance`: "<pos>:<hits>/<total>" per draft position, comma separated."""
        return ",".join(f"{i}:{h}/{t}" for i, (h, t) in enumerate(zip(self.position_hits, self.position_totals,
                                                                      strict=True)))


@dataclass
class StepOutput:
    """New tokens for one sample of a request from one engine step (never zero unless finished)."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS / stop token), "length", "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    index: int = 0  # which of the request's n samples
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when params.logprobs is set
    # on a sample's first output, when params.prompt_logprobs is set: one per prompt token, the first None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    timings: RequestTimings | None = None  # the sample's, as of this output
    speculation: SpecStats | None = None  # the sample's, as of this output; None until it first drafted
