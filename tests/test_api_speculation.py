"""Predicted outputs (OpenAI's `prediction`, Fireworks' `speculation`) and the per-request switch
(`speculation: false`): the output is exactly what it is without them (text, token ids, logprobs at
temperature 0, for every way of asking), bad values are 400s naming the field, and what the drafts
achieved comes back in usage and Fireworks' perf metrics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

from ember.api.protocol import CompletionRequest
from ember.engine.request import SamplingParams, SpecStats, StepOutput
from ember.serving.generate import plan_generation
from ember.serving.models import ServedModel
from ember.serving.prompts import Prompt
from ember.serving.sampling import plan_sampling, prediction_ids
from tests.server import MODEL

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LIST = [{"role": "user", "content": "List the numbers from one to ten in words, one per line."}]
WEEK = "The days of the week are:\n1. Monday\n"
MAX_TOKENS = 24
NUMBERS = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": {
    "type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "string"}}},
    "required": ["numbers"]}}}
UNRELATED = "The quick brown fox jumps over the lazy dog.\n" * 4
SPEC_METRICS = {"speculation-prompt-tokens", "speculation-prompt-matched-tokens", "speculation-generated-tokens",
                "speculation-acceptance"}


def _body(path: str, **fields) -> dict:
    where = {"messages": LIST} if path == CHAT else {"prompt": WEEK}
    return {"model": MODEL, **where, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
            **fields}


def _logprobs(lp: dict | None) -> list[float]:
    if lp is None:
        return []
    return [t["logprob"] for t in lp["content"]] if "content" in lp else lp["token_logprobs"]


def _choices(server, path: str, body: dict, stream: bool) -> list[tuple[str, list[int], list[float]]]:
    """Each choice's (text, token ids, logprobs) in index order, read raw (streamed chunks joined)."""
    if stream:
        parts = [c for event in server.stream(path, body) for c in event["choices"]]
    else:
        r = server.post(path, body)
        assert r.status_code == 200, r.text
        parts = r.json()["choices"]
    out: dict[int, tuple[str, list[int], list[float]]] = {}
    for c in parts:
        text = c["text"] if path == COMPLETIONS else \
            (c.get("delta") or {}).get("content") or (c.get("message") or {}).get("content") or ""
        seen = out.get(c["index"], ("", [], []))
        out[c["index"]] = (seen[0] + text, seen[1] + c.get("token_ids", []), seen[2] + _logprobs(c["logprobs"]))
    return [out[i] for i in sorted(out)]


def _same(got: list, expected: list) -> None:
    assert [(t, ids) for t, ids, _ in got] == [(t, ids) for t, ids, _ in expected]
    for (_, _, lp), (_, _, want) in zip(got, expected, strict=True):  # one forward pass or several: ~equal
        assert lp == pytest.approx(want, abs=1e-2)


def _edited(text: str) -> str:
    """`text` with its middle line rewritten (on one line: a few characters in its middle), so that a
    prediction of it is right before and after the edit."""
    lines = text.split("\n")
    if len(lines) >= 3:
        lines[len(lines) // 2] = "an edited line"
        return "\n".join(lines)
    middle = len(text) // 2
    return text[:middle] + "edit" + text[middle + 4:]


VARIANTS = [  # (endpoint, request fields, streamed): each endpoint streamed and not
    (CHAT, {}, False), (CHAT, {"n": 2}, False), (CHAT, {"stop": ["5."]}, True),
    (CHAT, {"logprobs": True, "top_logprobs": 2}, False), (CHAT, {"response_format": NUMBERS}, True),
    (CHAT, {"seed": 7}, False),
    (COMPLETIONS, {}, True), (COMPLETIONS, {"prompt": [WEEK, "Colours:\n- red\n"], "n": 2}, True),
    (COMPLETIONS, {"stop": ["5."]}, False), (COMPLETIONS, {"logprobs": 2}, True),
    (COMPLETIONS, {"response_format": NUMBERS}, False), (COMPLETIONS, {"seed": 7, "n": 2}, True),
]


@pytest.mark.parametrize("path,fields,stream", VARIANTS)
def test_a_prediction_never_changes_the_output(server, path, fields, stream):
    """Right, edited in the middle, or unrelated, in each of the ways to send it: the same text, token
    ids and logprobs as without."""
    body = _body(path, **fields)
    expected = _choices(server, path, body, stream)
    right = expected[0][0]
    assert right
    for prediction in ({"prediction": {"type": "content", "content": right}},
                       {"speculation": _edited(right)},
                       {"prediction": {"content": [{"type": "text", "text": UNRELATED[:20]},
                                                   {"type": "text", "text": UNRELATED[20:]}]}}):
        _same(_choices(server, path, {**body, **prediction}, stream), expected)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_inside_an_accepted_run_cuts_text_and_usage_as_without(server, stream):
    """Accepted drafts bring several tokens in one step; a stop string among them ends the text there and
    usage counts the tokens up to it, as one token a step would."""
    body = _body(CHAT, max_tokens=48, **({"stream_options": {"include_usage": True}} if stream else {}))
    text = _choices(server, CHAT, _body(CHAT, max_tokens=48), False)[0][0]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(text) > 40 and stop.strip()

    def answer(**fields) -> tuple[str, dict]:
        request = {**body, "stop": [stop], **fields}
        if stream:
            events = server.stream(CHAT, request)
            return "".join((c.get("delta") or {}).get("content") or "" for e in events for c in e["choices"]), \
                events[-1]["usage"]
        r = server.post(CHAT, request).json()
        return r["choices"][0]["message"]["content"], r["usage"]

    plain_text, plain_usage = answer()
    text_, usage = answer(prediction={"type": "content", "content": text})
    assert text_ == plain_text and plain_text.endswith(stop)
    assert usage["completion_tokens"] == plain_usage["completion_tokens"] < 48
    assert usage["completion_tokens_details"]["accepted_prediction_tokens"] > 5


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_speculation_forms_never_change_the_output(server, path):
    """Token ids, Fireworks' plain-string prediction, and prompt-lookup turned off (alone or beside a
    prediction, which still drafts) or left on."""
    body = _body(path)
    expected = _choices(server, path, body, False)
    text, ids, _ = expected[0]
    for fields in ({"speculation": ids}, {"speculation": ids[:5] + [7, 7, 7]}, {"prediction": text},
                   {"speculation": False}, {"speculation": False, "prediction": {"content": text}},
                   {"speculation": True}, {"speculation": None, "prediction": None}, {"speculation": ""}):
        _same(_choices(server, path, {**body, **fields}, False), expected)


BAD = [  # (fields, param)
    ({"prediction": {"type": "content", "content": 5}}, "prediction.content"),
    ({"prediction": {"type": "image", "content": "x"}}, "prediction.type"),
    ({"prediction": {"type": "content"}}, "prediction.content"),
    ({"prediction": {"content": [{"type": "text", "text": 1}]}}, "prediction.content[0].text"),
    ({"prediction": {"content": "x", "extra": 1}}, "prediction.extra"),
    ({"prediction": 5}, "prediction"),
    ({"speculation": 1.5}, "speculation"), ({"speculation": 3}, "speculation"), ({"speculation": {}}, "speculation"),
    ({"speculation": ["a"]}, "speculation[0]"), ({"speculation": [1, True]}, "speculation[1]"),
    ({"speculation": [1, -1]}, "speculation"), ({"speculation": [49152]}, "speculation"),  # past the vocabulary
    ({"speculation": [2**70]}, "speculation"),
    ({"prediction": {"content": "x"}, "speculation": "x"}, "speculation"),  # both: which one to use
    ({"prediction": "x", "speculation": [1, 2]}, "speculation"),
]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_bad_predictions_are_400s_naming_the_field(server, path):
    for fields, param in BAD:
        r = server.post(path, _body(path, **fields))
        assert r.status_code == 400, (fields, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (fields, error)
    r = server.post(path, _body(path, prediction="x", speculation="y"))
    assert "`prediction`" in r.json()["error"]["message"] and "`speculation`" in r.json()["error"]["message"]


def test_usage_reports_prediction_tokens_through_the_sdk(server):
    client = server.client()
    kw = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0)
    plain = client.chat.completions.create(messages=LIST, **kw)
    assert plain.usage.completion_tokens_details is None  # no prediction, no prediction counts
    predicted = {"type": "content", "content": plain.choices[0].message.content}
    answer = client.chat.completions.create(messages=LIST, prediction=predicted, **kw)
    details = answer.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0 and details.rejected_prediction_tokens >= 0
    assert details.reasoning_tokens == details.audio_tokens == 0
    chunks = list(client.chat.completions.create(messages=LIST, prediction=predicted, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.completion_tokens_details == details
    text = client.completions.create(prompt=WEEK, extra_body={"speculation": "2. Tuesday\n"}, **kw)
    assert text.usage.completion_tokens_details.accepted_prediction_tokens >= 0


def test_no_drafts_no_speculation_metrics(server):
    """Prompt lookup off and no prediction: nothing drafts, so no speculation metrics."""
    r = server.post(CHAT, _body(CHAT, speculation=False, perf_metrics_in_response=True))
    assert r.status_code == 200, r.text
    assert not SPEC_METRICS & set(r.json()["perf_metrics"])
    assert not any(k.startswith("fireworks-speculation-") for k in r.headers)


def _acceptance(text: str) -> list[tuple[int, int]]:
    """"0:5/6,1:4/5" -> [(5, 6), (4, 5)], checking the positions count up from 0."""
    assert re.fullmatch(r"\d+:\d+/\d+(,\d+:\d+/\d+)*", text), text
    entries = [re.fullmatch(r"(\d+):(\d+)/(\d+)", e).groups() for e in text.split(",")]  # type: ignore[union-attr]
    assert [int(p) for p, _, _ in entries] == list(range(len(entries)))
    return [(int(h), int(t)) for _, h, t in entries]


def _check_metrics(metrics: dict[str, str], predicted: int, usage: dict) -> None:
    assert set(metrics) >= SPEC_METRICS
    matched, generated = int(metrics["speculation-prompt-matched-tokens"]), \
        int(metrics["speculation-generated-tokens"])
    assert int(metrics["speculation-prompt-tokens"]) == predicted
    assert 0 < matched <= generated
    positions = _acceptance(metrics["speculation-acceptance"])
    assert all(h <= t for h, t in positions) and sum(t for _, t in positions) == generated
    assert sum(h for h, _ in positions) >= matched
    assert usage["completion_tokens_details"]["accepted_prediction_tokens"] == matched


def test_a_right_prediction_is_accepted_and_reported(server, tokenizer):
    """Headers and perf_metrics agree; the prediction's length is cut to max_tokens. (Needs an engine that
    drafts: issue 11's speculative decoding.)"""
    text = _choices(server, CHAT, _body(CHAT), False)[0][0]
    r = server.post(CHAT, _body(CHAT, prediction={"content": text + UNRELATED * 5}, perf_metrics_in_response=True))
    assert r.status_code == 200, r.text
    data = r.json()
    _check_metrics(data["perf_metrics"], MAX_TOKENS, data["usage"])
    headers = {k.removeprefix("fireworks-"): v for k, v in r.headers.items() if k.startswith("fireworks-speculation-")}
    assert headers == {k: data["perf_metrics"][k] for k in SPEC_METRICS}
    assert data["choices"][0]["message"]["content"] == text
    # streamed, n=2: the finishing chunk's perf_metrics, summed over the choices
    events = server.stream(CHAT, _body(CHAT, n=2, prediction=text, perf_metrics_in_response=True,
                                       stream_options={"include_usage": True}))
    finishing = [e for e in events if e.get("perf_metrics")]
    assert len(finishing) == 1
    _check_metrics(finishing[0]["perf_metrics"], min(len(tokenizer.encode(text, add_special_tokens=False)), MAX_TOKENS),
                   events[-1]["usage"])


def test_an_edited_prediction_is_followed_past_the_edit(server):
    """A prediction edited in the middle: some of its drafts are accepted, some rejected. (Needs an engine
    that drafts.)"""
    text = _choices(server, COMPLETIONS, _body(COMPLETIONS), False)[0][0]
    r = server.post(COMPLETIONS, _body(COMPLETIONS, speculation=_edited(text)))
    details = r.json()["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] > 0
    assert int(r.headers["fireworks-speculation-prompt-matched-tokens"]) == details["accepted_prediction_tokens"]


# the serving layer alone

def _completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})


def test_the_prediction_is_tokenized_without_bos_and_cut_to_each_prompts_max_tokens(tokenizer):
    request = _completion(prediction="Hello there, world", max_tokens=100)
    ids = prediction_ids(request, tokenizer, tokenizer.vocab_size)
    assert ids == tokenizer.encode("Hello there, world", add_special_tokens=False) and ids[0] != tokenizer.bos_token_id
    plan = plan_sampling(request, [10, 60], {}, 64, tokenizer.vocab_size, prediction=list(range(70)))
    assert [p.prediction for p in plan.params] == [list(range(54)), list(range(4))]  # 54 and 4 tokens of room
    assert plan_sampling(_completion(speculation=False), [10], {}, 64, 100).params == \
        [SamplingParams(max_tokens=54, speculate=False)]
    assert prediction_ids(_completion(speculation=[3, 4]), tokenizer, 100) == [3, 4]
    assert prediction_ids(_completion(speculation=True), tokenizer, 100) is None
    assert plan_sampling(_completion(speculation=""), [10], {}, 64, 100, prediction=[]).params[0].prediction is None


class _DraftingEngine:
    """Each sample of a request: three tokens in one output, with speculation counts."""

    max_model_len = 64

    def __init__(self, stats: list[SpecStats]) -> None:
        self.stats = stats

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        for i in range(params.n):
            yield StepOutput(request_id, [5, 6, 7], True, "length", len(prompt), index=i, speculation=self.stats[i])

    def abort(self, request_id: str, index: int) -> None:
        pass


def test_speculation_counts_are_summed_over_choices(tokenizer):
    a = SpecStats(8, proposed=5, accepted=3, prediction_accepted=3, prediction_rejected=1,
                  position_hits=[2, 1], position_totals=[3, 2])
    b = SpecStats(8, proposed=2, accepted=1, prediction_accepted=1, prediction_rejected=1,
                  position_hits=[1], position_totals=[2])
    model = ServedModel("m", _DraftingEngine([a, b]), tokenizer, tokenizer.vocab_size)  # type: ignore[arg-type]
    gen = plan_generation(model, _completion(n=2, max_tokens=3, speculation="abc"), [Prompt([1, 2], [])], "prompt", "r")
    assert gen.speculation() is None  # nothing yet
    asyncio.run(gen.collect())
    total = gen.speculation()
    assert total is not None
    assert (total.prediction_tokens, total.proposed, total.accepted, total.prediction_accepted,
            total.prediction_rejected, total.acceptance()) == (8, 7, 4, 4, 2, "0:3/5,1:1/2")
    assert gen.usage()["completion_tokens_details"] == {"accepted_prediction_tokens": 4,
                                                        "rejected_prediction_tokens": 2, "reasoning_tokens": 0,
                                                        "audio_tokens": 0}


@pytest.mark.parametrize("n", [1, 2])
def test_closing_a_stream_mid_prediction_frees_every_block(server, n):
    """A client gone while drafts are being verified: its sequences end at the next step, nothing held."""
    prediction = "Once upon a time there was a little fox who lived in a forest. " * 40
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=2000,
        stream=True, n=n, extra_body={"ignore_eos": True}, prediction={"type": "content", "content": prediction})
    for i, _ in enumerate(stream):
        if i == 4 + n:
            break
    stream.close()
    stats = server.wait_idle(timeout=5)
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0
