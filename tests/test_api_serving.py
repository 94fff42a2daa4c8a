"""The serving layer without a server: stop strings over chunked text, sampling defaults and
max_tokens fitting, request validation, chat truncation, and the assembly of choices (n samples,
echo, stop cuts, logprobs aligned with text) from a scripted engine that follows the engine contract."""

from __future__ import annotations

import asyncio
import copy
import json
from contextlib import aclosing

import pytest
from pydantic import ValidationError

from ember.api.chat import tool_calls_json
from ember.api.protocol import ChatCompletionRequest, CompletionRequest, NotYetSupported
from ember.engine.request import SamplingParams, StepOutput, TokenLogprob
from ember.models.tokenizer import Tokenizer
from ember.serving.errors import RequestError
from ember.serving.generate import ChoiceEvent, plan_generation
from ember.serving.models import ServedModel
from ember.serving.prompts import chat_prompt, completion_prompts
from ember.serving.sampling import DEFAULT_MAX_TOKENS, plan_sampling, sampling_defaults
from ember.serving.stop import StopMatcher
from ember.serving.tools import Tool, format_call


def run_stops(stops: list[str], chunks: list[str]) -> tuple[list[str], bool]:
    matcher, out = StopMatcher(stops), []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


@pytest.mark.parametrize("stops,chunks,expected,stopped", [
    (["END"], ["abc", "dEN", "Dxyz"], "abcdEND", True),  # across chunks, stop word kept
    (["END"], ["abcEN", "X"], "abcENX", False),  # a false start is released
    (["END"], ["abE"], "abE", False),  # held tail flushed at the end
    (["xyz", "b"], ["abxyz"], "ab", True),  # the earliest end wins
    ([], ["a", "b"], "ab", False),
    (["\n\n"], ["one\n", "\ntwo"], "one\n\n", True),
])
def test_stop_matcher(stops, chunks, expected, stopped):
    out, did_stop = run_stops(stops, chunks)
    assert "".join(out) == expected and did_stop == stopped


def test_stop_matcher_never_emits_a_possible_stop_prefix():
    out, _ = run_stops(["STOP"], ["go S", "T", "O", "P!"])
    assert out == ["go ", "", "", "STOP"]


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})


def test_sampling_defaults_from_generation_config():
    assert sampling_defaults({"temperature": 0.6, "top_p": 0.9, "min_p": 0.1, "max_length": 5}) == {
        "temperature": 0.6, "top_p": 0.9, "min_p": 0.1}
    assert sampling_defaults({"do_sample": False, "temperature": 0.6}) == {"temperature": 0.0}
    plan = plan_sampling(completion(top_p=0.5), [10], {"temperature": 0.6, "top_p": 0.9, "typical_p": 0.8},
                         8192, 100)
    assert plan.options == {"temperature": 0.6, "top_p": 0.5, "top_k": 0, "min_p": 0.0, "typical_p": 0.8,
                            "max_tokens": DEFAULT_MAX_TOKENS}
    assert (plan.params[0].temperature, plan.params[0].top_p, plan.params[0].typical_p) == (0.6, 0.5, 0.8)


def test_every_request_field_reaches_the_sampling_params():
    request = completion(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, typical_p=0.95,
                         repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=-0.5,
                         logit_bias={"7": -100, "12": 3.5}, mirostat_target=4.0, mirostat_lr=0.2, seed=9, n=3,
                         max_tokens=0, echo=True, logprobs=2, ignore_eos=True)
    plan = plan_sampling(request, [10], {}, 8192, 100)
    assert plan.params == [SamplingParams(
        temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, typical_p=0.95, repetition_penalty=1.2,
        frequency_penalty=0.5, presence_penalty=-0.5, logit_bias={7: -100, 12: 3.5}, mirostat_target=4.0,
        mirostat_lr=0.2, seed=9, n=3, max_tokens=0, ignore_eos=True, logprobs=2, prompt_logprobs=2)]
    assert plan.options == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "typical_p": 0.95,
                            "repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": -0.5,
                            "mirostat_target": 4.0, "mirostat_lr": 0.2, "seed": 9, "max_tokens": 0,
                            "logit_bias": {"7": -100, "12": 3.5}, "n": 3}
    # mirostat's learning rate is reported with its default; no echo, no prompt scoring
    plain = plan_sampling(completion(mirostat_target=3, logprobs=True, top_logprobs=4), [5], {}, 64, 100)
    assert plain.options["mirostat_lr"] == 0.1
    assert (plain.params[0].logprobs, plain.params[0].prompt_logprobs) == (4, None)


def test_logit_bias_outside_the_vocabulary_is_the_clients_mistake():
    with pytest.raises(RequestError) as info:
        plan_sampling(completion(logit_bias={"100": 1}), [3], {}, 64, 100)
    assert info.value.param == "logit_bias"


def test_max_tokens_fits_each_prompt_or_errors():
    plan = plan_sampling(completion(max_tokens=100), [10, 60], {}, 64, 100)
    assert [p.max_tokens for p in plan.params] == [54, 4]
    with pytest.raises(RequestError) as info:
        plan_sampling(completion(max_tokens=100, context_length_exceeded_behavior="error"), [10], {}, 64, 100)
    assert info.value.param == "max_tokens"


def test_request_models():
    req = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]], "max_completion_tokens": 3,
                                            "stop": "x", "reasoning_effort": "none", "images": []})
    assert req.requested_max_tokens == 3 and req.stop_list == ["x"] and req.prompt == [[1, 2], [3]]
    msg = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "tool", "content": [{"type": "text", "text": "a"}], "tool_call_id": "7"}]}).messages[0]
    assert msg.for_template() == {"role": "tool", "content": "a", "tool_call_id": "7"}
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "images": ["data:image/png;base64,"]})
    assert isinstance(info.value.errors()[0]["ctx"]["error"], NotYetSupported)


@pytest.mark.parametrize("fields,k,legacy,echo", [
    ({}, None, False, 0),
    ({"logprobs": True}, 0, False, 0),
    ({"logprobs": True, "top_logprobs": 3}, 3, False, 0),
    ({"logprobs": 0}, 0, True, 0),
    ({"logprobs": 4}, 4, True, 0),
    ({"logprobs": 4, "top_logprobs": 1}, 1, True, 0),  # Fireworks: top_logprobs overrides the count
    ({"logprobs": False, "top_logprobs": 0}, None, False, 0),
    ({"echo": True}, None, False, 10),
    ({"echo_last": 3}, None, False, 3),
    ({"echo_last": 30}, None, False, 10),
    ({"echo": True, "echo_last": 3}, None, False, 10),
])
def test_logprobs_and_echo_readings(fields, k, legacy, echo):
    req = completion(**fields)
    assert (req.num_logprobs, req.legacy_logprobs, req.echo_count(10)) == (k, legacy, echo)


def test_prompt_truncate_len_drops_the_oldest_non_system_messages(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} " * 5} for i in range(5)]
    full = chat_prompt(tokenizer, messages)
    assert chat_prompt(tokenizer, messages, len(full.token_ids)) == full
    without_two = chat_prompt(tokenizer, messages[:1] + messages[3:])
    assert chat_prompt(tokenizer, messages, len(without_two.token_ids)) == without_two
    assert chat_prompt(tokenizer, messages, len(without_two.token_ids) - 1) == \
        chat_prompt(tokenizer, messages[:1] + messages[4:])
    smallest = chat_prompt(tokenizer, messages[:1] + messages[-1:])
    with pytest.raises(RequestError) as info:
        chat_prompt(tokenizer, messages, len(smallest.token_ids) - 1)
    assert info.value.param == "prompt_truncate_len"
    assert full.fragments == [tokenizer.decode(full.token_ids)]


# -- choices from a scripted engine ----------------------------------------------------------------------


def _score(token_id: int, k: int) -> TokenLogprob:
    """Made-up but deterministic numbers: what matters here is which token they travel with."""
    return TokenLogprob(token_id, -(token_id % 97) / 10, [(token_id + j, -j - 0.5) for j in range(k)])


class ScriptedEngine:
    """The engine contract, played from scripts: sample i of a request emits script[i % len] one token
    per output, samples interleaved; aborts are recorded and obeyed."""

    max_model_len = 4096

    def __init__(self, scripts: list[list[int]], reason: str = "length") -> None:
        self.scripts, self.reason = scripts, reason
        self.aborted: list[tuple[str, int | None]] = []

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.aborted.append((request_id, index))

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams):
        scripts = [self.scripts[i % len(self.scripts)][:params.max_tokens] for i in range(params.n)]
        sent = [0] * params.n
        live = list(range(params.n))
        while live:
            for i in list(live):
                if (request_id, i) in self.aborted:
                    live.remove(i)
                    continue
                tokens, first = scripts[i][sent[i]:sent[i] + 1], sent[i] == 0
                sent[i] += 1
                finished = sent[i] >= len(scripts[i])
                k, pk = params.logprobs, params.prompt_logprobs
                yield StepOutput(request_id, tokens, finished, self.reason if finished else None, len(prompt),
                                 index=i, logprobs=None if k is None else [_score(t, k) for t in tokens],
                                 prompt_logprobs=[None, *(_score(t, pk) for t in prompt[1:])]
                                 if first and pk is not None else None)
                if finished:
                    live.remove(i)
                await asyncio.sleep(0)


def _generation(tokenizer: Tokenizer, scripts: list[str], reason: str = "length", tools: bool = False,
                **fields):
    engine = ScriptedEngine([tokenizer.encode(s) for s in scripts], reason)
    model = ServedModel("m", engine, tokenizer, tokenizer.vocab_size)  # type: ignore[arg-type]
    request = completion(**{"max_tokens": 64, **fields})
    gen = plan_generation(model, request, completion_prompts(tokenizer, request.prompt), "prompt", "r",
                          parse_tool_calls=tools)
    return gen, engine


async def _events(gen) -> list[ChoiceEvent]:
    async with aclosing(gen.events()) as events:
        return [ev async for ev in events]


def _run_both(tokenizer: Tokenizer, scripts: list[str], **fields) -> tuple[list[ChoiceEvent], list[ChoiceEvent]]:
    """(the streamed events, the collected choices) of the same scripted request."""
    streamed = asyncio.run(_events(_generation(tokenizer, scripts, **fields)[0]))
    collected = asyncio.run(_generation(tokenizer, scripts, **fields)[0].collect())
    return streamed, collected


def _offsets_point_into_the_text(tokenizer: Tokenizer, choice: ChoiceEvent) -> None:
    offsets = [t.offset for t in choice.tokens]
    assert offsets == sorted(offsets) and all(0 <= o <= len(choice.text) for o in offsets)
    for t in choice.tokens:  # a whole-character token's text sits at its offset (up to a stop cut)
        piece = tokenizer.token_bytes(t.token_id).decode("utf-8", errors="replace")
        if "\ufffd" not in piece:
            assert choice.text[t.offset:t.offset + len(piece)] == piece[:len(choice.text) - t.offset]


MIXED = "héllo 😀 wörld, 1, 2, 3 东京"


@pytest.mark.parametrize("fields", [{"logprobs": 2}, {"logprobs": True, "top_logprobs": 1, "echo": True},
                                    {"logprobs": 0, "echo_last": 2, "n": 2, "return_token_ids": True}])
def test_stream_concatenates_to_the_collected_choices(tokenizer, fields):
    streamed, collected = _run_both(tokenizer, [MIXED, "Another, shorter one."], prompt=["Say:", "Again:"],
                                    **fields)
    gen = _generation(tokenizer, [MIXED], **fields)[0]
    assert len(collected) == 2 * fields.get("n", 1)
    for choice in collected:
        mine = [ev for ev in streamed if ev.index == choice.index]
        assert mine[0].first and not any(ev.first for ev in mine[1:])
        assert [ev.finish_reason for ev in mine] == [None] * (len(mine) - 1) + ["length"] == \
            [None] * (len(mine) - 1) + [choice.finish_reason]
        assert "".join(ev.text for ev in mine) == choice.text
        assert [t for ev in mine for t in ev.tokens] == choice.tokens
        joined = {k: [] for k in gen.formatter.format([])}
        for ev in mine:
            for k, v in gen.formatter.format(ev.tokens).items():
                joined[k] += v
        assert joined == gen.formatter.format(choice.tokens)
        _offsets_point_into_the_text(tokenizer, choice)


def test_echo_scores_the_prompt_and_max_tokens_zero_returns_only_it(tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    (streamed, collected) = _run_both(tokenizer, [" Paris."], prompt=prompt, echo=True, max_tokens=0,
                                      logprobs=1)
    assert len(streamed) == 1 and streamed[0].first and streamed[0].finish_reason == "length"
    (choice,) = collected
    assert choice.text == prompt and [t.token_id for t in choice.tokens] == ids
    assert choice.tokens[0].logprob is None and all(t.prompt for t in choice.tokens)
    assert [t.logprob.logprob for t in choice.tokens[1:]] == [_score(t, 1).logprob for t in ids[1:]]
    _offsets_point_into_the_text(tokenizer, choice)
    (last,) = _run_both(tokenizer, [" Paris."], prompt=prompt, echo_last=2, logprobs=1)[1]
    assert last.text == tokenizer.decode(ids[-2:]) + " Paris."
    assert [t.token_id for t in last.tokens] == ids[-2:] + tokenizer.encode(" Paris.")
    assert [t.prompt for t in last.tokens] == [True, True] + [False] * len(tokenizer.encode(" Paris."))


@pytest.mark.parametrize("stop", [", 2", "😀", "ö"])
def test_a_stop_string_cuts_text_tokens_and_its_sample_only(tokenizer, stop):
    other = "No stop word in here at all, none whatsoever, in a sentence longer than the first one."
    gen, engine = _generation(tokenizer, [MIXED, other], n=2, stop=stop, logprobs=0, return_token_ids=True)
    first, second = asyncio.run(gen.collect())
    assert first.text == MIXED[:MIXED.index(stop) + len(stop)] and first.finish_reason == "stop"
    assert second.text == other and second.finish_reason == "length"
    assert engine.aborted[0] == ("r-0", 0)  # sample 0 alone; sample 1 ran on
    assert all(t.offset < len(first.text) for t in first.tokens)
    # the tokens reported are exactly those whose text starts before the cut
    ids = tokenizer.encode(MIXED)
    kept = [t.token_id for t in first.tokens]
    assert kept == ids[:len(kept)] and tokenizer.decode(kept).startswith(first.text)
    assert not tokenizer.decode(ids[:len(kept) - 1]).startswith(first.text)
    assert gen.completion_tokens >= len(kept) + len(tokenizer.encode(second.text))
    _offsets_point_into_the_text(tokenizer, first)


def test_raw_output_keeps_what_the_stop_string_cut(tokenizer):
    gen, _ = _generation(tokenizer, [MIXED], stop=", 1", raw_output=True, logprobs=True)
    (choice,) = asyncio.run(gen.collect())
    raw = choice.raw_output
    assert raw["prompt_token_ids"] == tokenizer.encode("x") and raw["prompt_fragments"] == ["x"]
    assert raw["completion"] == tokenizer.decode(raw["completion_token_ids"])
    assert raw["completion"].startswith(choice.text) and raw["grammar"] is None
    assert [e["token_id"] for e in raw["completion_logprobs"]["content"]] == raw["completion_token_ids"]
    assert len(raw["completion_token_ids"]) >= len(choice.tokens)


def test_logprob_formats(tokenizer):
    gen, _ = _generation(tokenizer, [" Paris."], logprobs=True, top_logprobs=2, return_token_ids=True)
    (choice,) = asyncio.run(gen.collect())
    ids = tokenizer.encode(" Paris.")
    content = gen.formatter.format(choice.tokens)["content"]
    assert [e["token"] for e in content] == [" Paris", "."] and [e["text_offset"] for e in content] == [0, 6]
    assert content[0]["bytes"] == list(b" Paris") and content[0]["logprob"] == _score(ids[0], 2).logprob
    assert [a["token_id"] for a in content[0]["top_logprobs"]] == [ids[0], ids[0] + 1]
    assert gen.choice_fields(choice, prompt_ids=True)["token_ids"] == ids
    assert gen.choice_fields(choice, prompt_ids=True)["prompt_token_ids"] == tokenizer.encode("x")
    gen, _ = _generation(tokenizer, [" Paris."], logprobs=1)
    (choice,) = asyncio.run(gen.collect())
    legacy = gen.formatter.format(choice.tokens)
    assert legacy["tokens"] == [" Paris", "."] and legacy["token_ids"] == ids
    assert legacy["text_offset"] == [0, 6]
    # the chosen token is listed beside the likeliest one (k + 1 entries when it is not among them)
    alt = tokenizer.token_bytes(ids[0]).decode()
    assert legacy["top_logprobs"][0] == {alt: -0.5} and "logprobs" in gen.choice_fields(choice, False)
    assert "token_ids" not in gen.choice_fields(choice, False)


def test_tool_calls_leave_the_text_and_stream_as_openai_deltas(tokenizer):
    script = format_call("add", '{"a": 1, "b": 2.5}') + "\n" + format_call("get_weather", '{"city": "Zürich"}')
    gen, _ = _generation(tokenizer, [script], reason="stop", tools=True, max_tokens=200)
    streamed = asyncio.run(_events(gen))
    assert all("<" not in ev.text for ev in streamed) and streamed[-1].finish_reason == "tool_calls"
    deltas = [d for ev in streamed for d in tool_calls_json(ev.tool_calls, streamed=True)]
    for index, name in enumerate(["add", "get_weather"]):
        mine = [d for d in deltas if d["index"] == index]
        assert mine[0]["id"].startswith("call_") and mine[0]["type"] == "function"
        assert mine[0]["function"]["name"] == name
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in mine[1:])
    (choice,) = asyncio.run(_generation(tokenizer, [script], reason="stop", tools=True, max_tokens=200)[0].collect())
    calls = tool_calls_json(choice.tool_calls, streamed=False)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("add", {"a": 1, "b": 2.5}), ("get_weather", {"city": "Zürich"})]
    assert [c["function"]["arguments"] for c in calls] == \
        ["".join(d["function"]["arguments"] for d in deltas if d["index"] == i) for i in range(2)]
    assert choice.text == "" and choice.finish_reason == "tool_calls"
    (text,) = asyncio.run(_generation(tokenizer, ["Just words."], reason="stop", tools=True)[0].collect())
    assert (text.text, text.tool_calls, text.finish_reason) == ("Just words.", [], "stop")


HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>"
    "<|im_end|>\n{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{{ c.function.arguments }}\n</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_tools_reach_the_prompt_through_a_template_that_knows_them(tokenizer):
    tools = [Tool("add", {"type": "object"}), Tool("sub", {"type": "object"})]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    own = chat_prompt(tokenizer, messages, tools=tools).fragments[0]  # SmolLM2's template knows no tools
    assert "You can call functions" in own and format_call("add", '{"a": 1}') in own and "<tool_response>" in own
    hermes = copy.copy(tokenizer)
    hermes._templates, hermes.chat_template = {"default": HERMES_TEMPLATE}, HERMES_TEMPLATE
    native = chat_prompt(hermes, messages, tools=tools).fragments[0]
    assert native.startswith("<|im_start|>system\n<tools>add;sub;</tools>") and "You can call" not in native
    assert '<tool_call>\n{"a": 1}\n</tool_call>' in native and "<|im_start|>tool\n2" in native


def test_a_function_may_be_named_like_a_tool_choice():
    tools = [{"type": "function", "function": {"name": n}} for n in ("auto", "required", "none")]
    for choice, mode, forced in [({"type": "function", "function": {"name": "auto"}}, "function", "auto"),
                                 ({"type": "function", "name": "none"}, "function", "none"),
                                 ("required", "required", None), ("any", "required", None), (None, "auto", None)]:
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                        "tools": tools, "tool_choice": choice})
        assert (request.tool_mode, request.forced_function) == (mode, forced)
    legacy = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                   "functions": [{"name": "f"}], "function_call": {"name": "f"}})
    assert (legacy.tool_mode, legacy.forced_function) == ("function", "f")
    assert [f.name for f in legacy.function_defs] == ["f"]
