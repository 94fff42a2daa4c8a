"""Request fields → SamplingParams: the model's defaults for what the client left out, max_tokens
fitted to the context window, logprobs and prompt scoring as the response will need them, the
predicted output as token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ember.engine.request import SamplingParams
from ember.serving.errors import RequestError
from ember.structured.backend import Grammar

if TYPE_CHECKING:
    from ember.models.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 2048
# OpenAI's defaults (the filters off), used when neither the request nor the model's generation config says
FALLBACK_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0}
# request fields with no model default: reported in fireworks-sampling-options only when the client set them
_OPTIONAL = ("repetition_penalty", "frequency_penalty", "presence_penalty", "mirostat_target", "mirostat_lr",
             "seed")
# a temperature below this samples like greedy anyway, and dividing float32 logits by it overflows to inf
# (vLLM's threshold): it means greedy
MIN_TEMPERATURE = 1e-5
# the engine's priority (lower runs first) by OpenAI's service_tier; the other tiers are the default, 0
TIER_PRIORITY = {"priority": -1, "flex": 1}
_NEUTRAL = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "mirostat_lr": SamplingParams.mirostat_lr}


class SamplingRequest(Protocol):
    """What serving reads from a chat or text completion request (the API's pydantic models)."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    typical_p: float | None
    repetition_penalty: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    logit_bias: dict[str, float] | None
    mirostat_target: float | None
    mirostat_lr: float | None
    seed: int | None
    n: int
    ignore_eos: bool
    context_length_exceeded_behavior: str
    prompt_cache_isolation_key: str | None  # the prefix-cache namespace: blocks are shared only within it
    prompt_cache_max_len: int | None  # at most this many prompt tokens read from or stored in the cache
    service_tier: str | None  # "flex" yields to other requests (batch jobs run so), "priority" goes first

    @property
    def predicted(self) -> str | list[int] | None: ...  # the expected output (prediction / speculation)

    @property
    def speculate(self) -> bool: ...  # False: no prompt-lookup drafts

    @property
    def requested_max_tokens(self) -> int | None: ...

    @property
    def num_logprobs(self) -> int | None: ...

    @property
    def wants_echo(self) -> bool: ...


def sampling_defaults(generation_config: dict) -> dict:
    """The sampling keys of a Hugging Face generation_config; `do_sample: false` means greedy."""
    defaults = {k: generation_config[k] for k in FALLBACK_DEFAULTS if generation_config.get(k) is not None}
    if generation_config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


@dataclass
class SamplingPlan:
    params: list[SamplingParams]  # one per prompt
    options: dict  # the values used, echoed to the client (fireworks-sampling-options)


def _logit_bias(request: SamplingRequest, vocab_size: int) -> dict[int, float]:
    bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
    if any(not 0 <= t < vocab_size for t in bias):
        raise RequestError(f"logit_bias keys must be token ids in [0, {vocab_size})", "logit_bias")
    return bias


def prediction_ids(request: SamplingRequest, tokenizer: Tokenizer, vocab_size: int) -> list[int] | None:
    """The predicted output as token ids. Text is encoded as the model would write it: no BOS, and special
    tokens it names (a template's <tool_call>, say) as their ids, which is what the model generates. CPU
    work for the worker threads, like the prompt's."""
    predicted = request.predicted
    if isinstance(predicted, str):
        return tokenizer.encode(predicted, add_special_tokens=False)
    if predicted is not None and any(not 0 <= t < vocab_size for t in predicted):
        raise RequestError(f"speculation token ids must lie in [0, {vocab_size})", "speculation")
    return predicted


def plan_sampling(request: SamplingRequest, prompt_lens: list[int], defaults: dict, max_model_len: int,
                  vocab_size: int, grammar: Grammar | None = None,
                  prediction: list[int] | None = None) -> SamplingPlan:
    """max_tokens defaults to 2048 and is lowered to the room the context leaves, unless the client
    asked for `context_length_exceeded_behavior: error`. An echo with logprobs scores the prompt. A
    temperature under MIN_TEMPERATURE is greedy.
    `grammar` constrains every sample; `prediction` (prediction_ids) goes to every sample, cut to its
    max_tokens (as Fireworks caps it): drafts past the output's end could never be accepted."""
    chosen = {k: _first(getattr(request, k), defaults.get(k), fallback)
              for k, fallback in FALLBACK_DEFAULTS.items()}
    if chosen["temperature"] < MIN_TEMPERATURE:
        chosen["temperature"] = 0.0
    optional = {k: getattr(request, k) for k in _OPTIONAL if getattr(request, k) is not None}
    bias = _logit_bias(request, vocab_size)
    logprobs = request.num_logprobs
    requested = request.requested_max_tokens
    params = []
    for length in prompt_lens:
        room = max_model_len - length
        if request.context_length_exceeded_behavior == "error" and requested is not None and requested > room:
            raise RequestError(f"prompt ({length} tokens) plus max_tokens ({requested}) exceeds the "
                               f"context window of {max_model_len} tokens", "max_tokens",
                               code="context_length_exceeded")
        max_tokens = min(DEFAULT_MAX_TOKENS if requested is None else requested, room)
        params.append(SamplingParams(
            **chosen, **{k: optional.get(k, _NEUTRAL[k]) for k in _NEUTRAL},
            logit_bias=bias, mirostat_target=request.mirostat_target, seed=request.seed, n=request.n,
            max_tokens=max_tokens, ignore_eos=request.ignore_eos, logprobs=logprobs,
            prompt_logprobs=logprobs if request.wants_echo else None, grammar=grammar,
            cache_salt=request.prompt_cache_isolation_key, prompt_cache_max_len=request.prompt_cache_max_len,
            prediction=(prediction or [])[:max_tokens] or None,
            speculate=request.speculate, priority=TIER_PRIORITY.get(request.service_tier or "", 0)))
    options = {**chosen, **optional, "max_tokens": max(p.max_tokens for p in params)}
    if request.mirostat_target is not None:
        options["mirostat_lr"] = params[0].mirostat_lr
    if bias:
        options["logit_bias"] = {str(k): v for k, v in bias.items()}
    if request.n > 1:
        options["n"] = request.n
    return SamplingPlan(params, options)


def _first(*values):
    return next(v for v in values if v is not None)
