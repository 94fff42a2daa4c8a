"""From prompts to streamed choice events: one engine request per prompt (its n samples share the
prefill), each sample detokenised, echoed, cut at stop strings, split into content and tool calls,
with its tokens and logprobs kept in step with its text, and the usage, timings and speculation counts
they add up to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Protocol

from ember.engine.request import RequestTimings, SpecStats, StepOutput, TokenLogprob
from ember.serving.logprobs import LogprobFormatter, OffsetDetokenizer, TokenOut, text_with_offsets
from ember.serving.models import ServedModel
from ember.serving.prompts import Prompt, check_prompts
from ember.serving.sampling import SamplingPlan, SamplingRequest, plan_sampling, prediction_ids
from ember.serving.stop import StopMatcher
from ember.serving.tools import ToolCallDelta, ToolCallParser
from ember.structured.backend import Grammar


class GenerationRequest(SamplingRequest, Protocol):
    raw_output: bool | None
    return_token_ids: bool | None

    @property
    def stop_list(self) -> list[str]: ...

    @property
    def legacy_logprobs(self) -> bool: ...

    def echo_count(self, prompt_len: int) -> int: ...


@dataclass
class ChoiceEvent:
    """New output of one choice; a streamed chunk, and (merged) a whole choice."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" on a choice's last event
    tokens: list[TokenOut] = field(default_factory=list)  # those whose text starts in `text`, echo first
    first: bool = False  # the choice's first event
    raw_output: dict | None = None  # on the last event, when the request asked for raw_output
    tool_calls: list[ToolCallDelta] = field(default_factory=list)  # when the request has tools


class _Choice:
    """One sample: echo ahead, text through the detokenizer and the stop strings. A token is released
    with the event whose text holds its start; tokens that start beyond a stop string's cut never are."""

    def __init__(self, gen: Generation, index: int, prompt: Prompt) -> None:
        self.gen, self.index, self.prompt = gen, index, prompt
        self.detok: OffsetDetokenizer | None = None  # made at the first output, after the echo
        self.matcher = StopMatcher(gen.stops)
        self.parser = ToolCallParser() if gen.parse_tool_calls else None
        self.emitted = 0  # characters of this choice's text sent so far
        self.pending: list[TokenOut] = []
        self.token_ids: list[int] = []  # everything generated, for raw_output
        self.logprobs: list[TokenLogprob] = []
        self.sent = self.done = False
        self.counted = 0  # of the last output's tokens, those the usage counts

    def _echo(self, out: StepOutput) -> tuple[str, list[TokenOut]]:
        ids = self.prompt.token_ids
        start = len(ids) - self.gen.request.echo_count(len(ids))
        if start == len(ids):
            return "", []
        # the prompt as the model saw it: a chat template's special tokens stay
        text, offsets = text_with_offsets(self.gen.tokenizer, ids[start:], False, ids[:start])
        scores = out.prompt_logprobs or [None] * len(ids)
        return text, [TokenOut(t, o, scores[start + j], prompt=True)
                      for j, (t, o) in enumerate(zip(ids[start:], offsets, strict=True))]

    def step(self, out: StepOutput) -> ChoiceEvent | None:
        echo_text, echo_tokens = "", []
        if self.detok is None:
            echo_text, echo_tokens = self._echo(out)
            self.emitted = len(echo_text)
            self.detok = OffsetDetokenizer(self.gen.tokenizer, True, self.prompt.token_ids, start=self.emitted)
        text, offsets = self.detok.add(out.token_ids)
        if out.finished:
            text += self.detok.flush()
        scores = out.logprobs or [None] * len(out.token_ids)
        self.pending += [TokenOut(*t) for t in zip(out.token_ids, offsets, scores, strict=True)]
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        emit, stopped = self.matcher.feed(text)
        if out.finished and not stopped:
            emit += self.matcher.flush()
        self.emitted += len(emit)
        self.done = stopped or out.finished
        # usage counts the tokens up to the one that completed a stop string: a step that brought several
        # (accepted drafts) counts what one at a time would have
        self.counted = sum(o < self.emitted for o in offsets) if stopped else len(out.token_ids)
        cut = len(self.pending) if out.finished and not stopped else \
            next((i for i, t in enumerate(self.pending) if t.offset >= self.emitted), len(self.pending))
        released, self.pending = self.pending[:cut], self.pending[cut:]
        content, calls, reason = emit, [], "stop" if stopped else out.finish_reason
        if self.parser is not None:
            content, calls = self.parser.feed(emit)
            if self.done:
                calls += self.parser.finish()
                reason = "tool_calls" if reason == "stop" and self.parser.called else reason
        if not (echo_text or content or calls or self.done or (released and self.gen.reports_tokens)):
            return None  # nothing to tell yet (e.g. a tool call's opening tag is still being read)
        event = ChoiceEvent(self.index, echo_text + content, reason, echo_tokens + released, not self.sent,
                            tool_calls=calls)
        self.sent = True
        if self.done and self.gen.request.raw_output:
            event.raw_output = self._raw_output()
        return event

    def _raw_output(self) -> dict:
        """What the model saw and produced: the whole generation, special tokens and anything past a
        stop string included (up to where the engine stopped), with logprobs in OpenAI's format."""
        text, offsets = text_with_offsets(self.gen.tokenizer, self.token_ids, False, self.prompt.token_ids)
        fmt = self.gen.formatter
        logprobs = fmt.openai([TokenOut(*t) for t in zip(self.token_ids, offsets, self.logprobs, strict=True)]) \
            if fmt else None
        return {"prompt_fragments": self.prompt.fragments, "prompt_token_ids": self.prompt.token_ids,
                "completion": text, "completion_token_ids": self.token_ids, "completion_logprobs": logprobs,
                "grammar": self.gen.grammar.text if self.gen.grammar else None}


class Generation:
    """All choices of one request (n per prompt, choice i = sample i % n of prompt i // n) and their usage."""

    def __init__(self, model: ServedModel, prompts: list[Prompt], plan: SamplingPlan,
                 request: GenerationRequest, request_id: str, grammar: Grammar | None = None,
                 parse_tool_calls: bool = False) -> None:
        self.model, self.prompts, self.plan, self.request = model, prompts, plan, request
        self.grammar, self.parse_tool_calls = grammar, parse_tool_calls
        self.tokenizer = model.tokenizer
        self.n, self.stops = request.n, request.stop_list
        self.formatter = LogprobFormatter(self.tokenizer, request.legacy_logprobs) \
            if request.num_logprobs is not None else None
        self.reports_tokens = self.formatter is not None or bool(request.return_token_ids)
        self.request_id = request_id
        # the request's phases (time.perf_counter()): arrival, then its preparation in a worker thread; the
        # caller that ran the preparation marks them (mark_preparation), else they collapse to now
        self.started = self.prepared_from = self.prepared_at = time.perf_counter()
        self.engine_timings: RequestTimings | None = None  # the first sample's phases in the engine
        self.last_token_at: float | None = None
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None  # the first choice's, once it has finished (usage records)
        self.token_gaps: list[float] = []  # seconds between consecutive engine outputs (inter-token latency)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.spec_stats: dict[int, SpecStats] = {}  # each choice's latest, once the engine set them up

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)  # once per prompt, however many samples (OpenAI)

    @property
    def sampling_options(self) -> dict:
        return self.plan.options

    @property
    def queue_time(self) -> float | None:
        """Seconds the first sample waited in the engine for its first step (usage records)."""
        t = self.engine_timings
        return None if t is None or t.scheduled is None else t.scheduled - t.arrival

    def mark_preparation(self, arrived: float, started: float, ended: float) -> None:
        self.started, self.prepared_from, self.prepared_at = arrived, started, ended

    def phases(self) -> dict[str, float]:
        """Fireworks' perf-metric durations in seconds, measured: waiting for a worker, preparing (templates,
        tokenization, grammars), waiting for the engine's first step, prefill up to the first token, and
        generation after it (the engine decodes a sequence in the step right after its prefill, so there
        is no generation queue). Together they make the processing time so far."""
        now = time.perf_counter()
        t = self.engine_timings
        scheduled = t.scheduled if t and t.scheduled is not None else now
        first = self.first_token_at or now
        prefill_queue = max(0.0, min(scheduled, first) - self.prepared_at)
        return {"tokenizer-queue-duration": self.prepared_from - self.started,
                "tokenizer-duration": self.prepared_at - self.prepared_from,
                "prefill-queue-duration": prefill_queue,
                "prefill-duration": max(0.0, first - self.prepared_at - prefill_queue),
                "generation-queue-duration": 0.0,
                "generation-duration": (self.last_token_at or first) - first,
                "server-time-to-first-token": first - self.started,
                "server-processing-time": now - self.started}

    def time_to_first_token(self) -> float:
        return (self.first_token_at or time.perf_counter()) - self.started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def speculation(self) -> SpecStats | None:
        """The choices' speculative decoding together (None before any choice had its counts): sums, drafts
        accepted and verified position by position, and the prediction's length for one choice."""
        stats = list(self.spec_stats.values())
        if not stats:
            return None
        return SpecStats(
            prediction_tokens=max(s.prediction_tokens for s in stats), proposed=sum(s.proposed for s in stats),
            accepted=sum(s.accepted for s in stats), prediction_accepted=sum(s.prediction_accepted for s in stats),
            prediction_rejected=sum(s.prediction_rejected for s in stats),
            position_hits=[sum(c) for c in zip_longest(*(s.position_hits for s in stats), fillvalue=0)],
            position_totals=[sum(c) for c in zip_longest(*(s.position_totals for s in stats), fillvalue=0)])

    def usage(self) -> dict:
        """OpenAI's usage; with a prediction, also how many of its tokens were accepted and rejected."""
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        if self.request.predicted is not None:
            spec = self.speculation() or SpecStats()
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": spec.prediction_accepted,
                "rejected_prediction_tokens": spec.prediction_rejected, "reasoning_tokens": 0, "audio_tokens": 0}
        return usage

    def choice_fields(self, event: ChoiceEvent, prompt_ids: bool) -> dict:
        """What a choice (or a chunk's choice) carries besides its text: `logprobs` always (null when
        not asked for), `token_ids` and, with `prompt_ids`, `prompt_token_ids` on the choice's first
        event (return_token_ids), and `raw_output` on its last."""
        fields: dict = {"logprobs": self.formatter.format(event.tokens) if self.formatter else None}
        if self.request.return_token_ids:
            fields["token_ids"] = [t.token_id for t in event.tokens if not t.prompt]
            if prompt_ids and event.first:
                fields["prompt_token_ids"] = self.prompts[event.index // self.n].token_ids
        if event.raw_output is not None:
            fields["raw_output"] = event.raw_output
        return fields

    async def _prompt_events(self, p: int) -> AsyncIterator[ChoiceEvent]:
        """One engine request for prompt p's n samples. A sample cut by a stop string is aborted alone;
        returning (all done, or the consumer gone) closes the engine stream, which aborts the rest."""
        prompt = self.prompts[p]
        choices = [_Choice(self, p * self.n + i, prompt) for i in range(self.n)]
        engine, request_id, live = self.model.engine, f"{self.request_id}-{p}", self.n
        stream = engine.generate(request_id, prompt.token_ids, self.plan.params[p])
        first = True
        async with aclosing(stream):
            async for out in stream:
                now = time.perf_counter()
                if self.first_token_at is None:
                    self.first_token_at = now
                if out.token_ids:
                    if self.last_token_at is not None:
                        self.token_gaps.append(now - self.last_token_at)
                    self.last_token_at = now
                if first:  # a prompt's cache hit counts once, not once per sample
                    self.cached_tokens += out.num_cached_tokens
                    first = False
                    if self.engine_timings is None:
                        self.engine_timings = out.timings
                choice = choices[out.index]
                if out.speculation is not None:
                    self.spec_stats[choice.index] = out.speculation
                if choice.done:  # stopped by a stop string; the engine has not seen the abort yet
                    continue
                event = choice.step(out)
                self.completion_tokens += choice.counted
                if event is not None and event.index == 0 and event.finish_reason is not None:
                    self.finish_reason = event.finish_reason
                if choice.done:
                    live -= 1
                    if live and not out.finished:
                        engine.abort(request_id, out.index)
                if event is not None:
                    yield event
                if not live:
                    return

    async def collect(self) -> list[ChoiceEvent]:
        """Every choice whole, in order: the non-streaming answer."""
        merged = [ChoiceEvent(i, "", first=True) for i in range(self.num_choices)]
        async with aclosing(self.events()) as events:
            async for ev in events:
                m = merged[ev.index]
                m.text += ev.text
                m.tokens += ev.tokens
                m.finish_reason = ev.finish_reason or m.finish_reason
                m.raw_output = ev.raw_output or m.raw_output
                m.tool_calls += ev.tool_calls
        return merged

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Every choice's events as they come; closing this iterator aborts all unfinished choices."""
        if len(self.prompts) == 1:
            async with aclosing(self._prompt_events(0)) as only:
                async for event in only:
                    yield event
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(p: int) -> None:
            try:
                async for event in self._prompt_events(p):
                    queue.put_nowait(event)
            except Exception as exc:  # re-raised to the consumer below
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(done)

        tasks = [asyncio.create_task(pump(p)) for p in range(len(self.prompts))]
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


def plan_generation(model: ServedModel, request: GenerationRequest, prompts: list[Prompt],
                    prompt_param: str, request_id: str, grammar: Grammar | None = None,
                    parse_tool_calls: bool = False) -> Generation:
    """Checks the prompts against the model, fills sampling defaults, tokenizes the prediction; nothing
    runs until events().
    `grammar` constrains every sample; `parse_tool_calls` splits their text into content and calls."""
    check_prompts(prompts, model.vocab_size, model.max_model_len, prompt_param)
    plan = plan_sampling(request, [len(p.token_ids) for p in prompts], model.sampling_defaults,
                         model.max_model_len, model.vocab_size, grammar,
                         prediction_ids(request, model.tokenizer, model.vocab_size))
    return Generation(model, prompts, plan, request, request_id, grammar, parse_tool_calls)
