"""From prompts to streamed choice events: n samples per prompt, detokenised, cut at stop strings,
with the usage and timings they add up to."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from ember.models.tokenizer import IncrementalDetokenizer
from ember.serving.models import ServedModel
from ember.serving.prompts import check_prompts
from ember.serving.sampling import SamplingPlan, SamplingRequest, plan_sampling
from ember.serving.stop import StopMatcher


class GenerationRequest(SamplingRequest, Protocol):
    n: int

    @property
    def stop_list(self) -> list[str]: ...


@dataclass
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" on a choice's last event


class Generation:
    """All choices of one request (n per prompt, choice i = prompt i // n) and their usage."""

    def __init__(self, model: ServedModel, prompts: list[list[int]], plan: SamplingPlan, n: int,
                 stops: list[str], request_id: str) -> None:
        self.model, self.prompts, self.plan, self.n, self.stops = model, prompts, plan, n, stops
        self.request_id = request_id
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)  # once per prompt, however many samples (OpenAI)

    @property
    def sampling_options(self) -> dict:
        return self.plan.options

    def time_to_first_token(self) -> float:
        return (self.first_token_at or time.perf_counter()) - self.started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    async def _choice(self, index: int) -> AsyncIterator[ChoiceEvent]:
        """One engine sequence; returning early (stop string, consumer gone) closes it, which aborts it."""
        prompt_index, sample_index = divmod(index, self.n)
        prompt, params = self.prompts[prompt_index], self.plan.params[prompt_index]
        if params.seed is not None and sample_index:  # n samples with one seed must still differ
            params = dataclasses.replace(params, seed=params.seed + sample_index)
        detok = IncrementalDetokenizer(self.model.tokenizer, skip_special_tokens=True, prefix_ids=prompt)
        matcher = StopMatcher(self.stops)
        stream = self.model.engine.generate(f"{self.request_id}-{index}", prompt, params)
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
                if stopped or out.finished:
                    tail = "" if stopped else matcher.flush()
                    yield ChoiceEvent(index, emit + tail, "stop" if stopped else out.finish_reason)
                    return
                if emit:
                    yield ChoiceEvent(index, emit)

    async def collect(self) -> list[tuple[str, str | None]]:
        """(text, finish_reason) of every choice, in order: the non-streaming answer."""
        texts, reasons = [""] * self.num_choices, [None] * self.num_choices
        async with aclosing(self.events()) as events:
            async for ev in events:
                texts[ev.index] += ev.text
                reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        return list(zip(texts, reasons, strict=True))

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
                    queue.put_nowait(event)
            except Exception as exc:  # re-raised to the consumer below
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(done)

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


def plan_generation(model: ServedModel, request: GenerationRequest, prompts: list[list[int]],
                    prompt_param: str, request_id: str) -> Generation:
    """Checks the prompts against the model, fills sampling defaults; nothing runs until events()."""
    check_prompts(prompts, model.vocab_size, model.max_model_len, prompt_param)
    plan = plan_sampling(request, [len(p) for p in prompts], model.sampling_defaults, model.max_model_len)
    return Generation(model, prompts, plan, request.n, request.stop_list, request_id)
