"""Request fields → SamplingParams: the model's defaults for what the client left out, max_tokens
fitted to the context window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ember.engine.request import SamplingParams
from ember.serving.errors import RequestError

DEFAULT_MAX_TOKENS = 2048
# OpenAI's defaults, used when neither the request nor the model's generation config says
FALLBACK_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


class SamplingRequest(Protocol):
    """What serving reads from a chat or text completion request (the API's pydantic models)."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    ignore_eos: bool
    context_length_exceeded_behavior: str

    @property
    def requested_max_tokens(self) -> int | None: ...


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


def plan_sampling(request: SamplingRequest, prompt_lens: list[int], defaults: dict,
                  max_model_len: int) -> SamplingPlan:
    """max_tokens defaults to 2048 and is lowered to the room the context leaves, unless the client
    asked for `context_length_exceeded_behavior: error`."""
    chosen = {k: _first(getattr(request, k), defaults.get(k), fallback)
              for k, fallback in FALLBACK_DEFAULTS.items()}
    requested = request.requested_max_tokens
    params = []
    for length in prompt_lens:
        room = max_model_len - length
        if request.context_length_exceeded_behavior == "error" and requested is not None and requested > room:
            raise RequestError(f"prompt ({length} tokens) plus max_tokens ({requested}) exceeds the "
                               f"context window of {max_model_len} tokens", "max_tokens",
                               code="context_length_exceeded")
        params.append(SamplingParams(**chosen, seed=request.seed, ignore_eos=request.ignore_eos,
                                     max_tokens=min(requested or DEFAULT_MAX_TOKENS, room)))
    options = {**chosen, "max_tokens": max(p.max_tokens for p in params)}
    return SamplingPlan(params, options)


def _first(*values):
    return next(v for v in values if v is not None)
