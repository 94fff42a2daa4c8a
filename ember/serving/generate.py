"""From a validated request to streamed choice events: prompts, sampling parameters, stop strings, usage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from ember.engine.request import SamplingParams
from ember.models.tokenizer import IncrementalDetokenizer
from ember.serving.errors import RequestError
from ember.serving.models import ServedModel
from ember.serving.stop import StopMatcher

DEFAULT_MAX_TOKENS = 2048


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class Generation:
    """All choices of one request (n per prompt) and the usage they add up to."""

    model: ServedModel
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt
    n: int
    stops: list[str]
    sampling_options: dict
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def timing_headers(self) -> dict[str, str]:
        now = time.perf_counter()
        ttft = (self.first_token_at or now) - self.started
        return {"fireworks-prompt-tokens": str(self.prompt_tokens),
                "fireworks-cached-prompt-tokens": str(self.cached_tokens),
                "fireworks-server-time-to-first-token": f"{ttft:.4f}",
                "fireworks-server-processing-time": f"{now - self.started:.4f}"}

    async def _choice(self, index: int) -> AsyncIterator[ChoiceEvent]:
        prompt_index, sample_index = divmod(index, self.n)
        params = self.params[prompt_index]
        if params.seed is not None and sample_index:
            params = SamplingParams(**{**vars(params), "seed": params.seed + sample_index})
        detok = IncrementalDetokenizer(self.model.tokenizer, skip_special_tokens=True)
        matcher = StopMatcher(self.stops)
        stream = self.model.engine.generate(f"{self.request_id}-{index}", self.prompts[prompt_index], params)
        first = True
        async with aclosing(stream):
            async for out in stream:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                if first and sample_index == 0:  # a prompt's cache hit counts once, not once per sample
                    self.cached_tokens += out.num_cached_tokens
                first = False
                self.completion_tokens += len(out.token_ids)
                text = detok.add(out.token_ids) + (detok.flush() if out.finished else "")
                emit, stopped = matcher.feed(text)
                if stopped:
                    yield ChoiceEvent(index, emit, "stop")
                    return
                if out.finished:
                    yield ChoiceEvent(index, emit + matcher.flush(), out.finish_reason)
                    return
                if emit:
                    yield ChoiceEvent(index, emit)

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Every choice's events as they come; closing this iterator aborts all unfinished choices."""
        if self.num_choices == 1:
            async with aclosing(self._choice(0)) as only:
                async for event in only:
                    yield event
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int) -> None:
            try:
                async for event in self._choice(index):
                    await queue.put(event)
            except Exception as exc:  # surfaced to the consumer below
                await queue.put(exc)
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(i)) for i in range(self.num_choices)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def plan_generation(model: ServedModel, request, prompts: list[list[int]], prompt_param: str) -> Generation:
    """Sampling parameters with the model's defaults, max_tokens fitted to the context, checks."""
    vocab = model.tokenizer.vocab_size
    for p in prompts:
        if any(t >= vocab for t in p):
            raise RequestError(f"prompt token ids must be below the vocabulary size {vocab}", prompt_param)
    defaults = model.sampling_defaults
    temperature = _pick(request.temperature, defaults.get("temperature"), 1.0)
    top_p = _pick(request.top_p, defaults.get("top_p"), 1.0)
    top_k = _pick(request.top_k, defaults.get("top_k"), 0)
    requested = request.requested_max_tokens
    limit = model.max_model_len
    params = []
    for p in prompts:
        if len(p) >= limit:
            raise RequestError(f"the prompt is {len(p)} tokens long; this model's context window is {limit} tokens "
                               "and must leave room for at least one generated token", prompt_param,
                               code="context_length_exceeded")
        room = limit - len(p)
        if request.context_length_exceeded_behavior == "error" and requested is not None and requested > room:
            raise RequestError(f"prompt ({len(p)} tokens) plus max_tokens ({requested}) exceeds the context window "
                               f"of {limit} tokens", "max_tokens", code="context_length_exceeded")
        params.append(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=request.seed,
                                     max_tokens=min(requested or DEFAULT_MAX_TOKENS, room),
                                     ignore_eos=request.ignore_eos))
    options = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
               "max_tokens": params[0].max_tokens if params else None}
    return Generation(model, prompts, params, request.n, request.stop_list, options)


def _pick(requested, model_default, fallback):
    if requested is not None:
        return requested
    return model_default if model_default is not None else fallback
