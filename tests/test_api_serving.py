"""The serving layer's pure parts, without a server: stop strings over chunked text, sampling
defaults and max_tokens fitting, request validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from ember.api.protocol import ChatCompletionRequest, CompletionRequest, NotYetSupported
from ember.serving.errors import RequestError
from ember.serving.sampling import DEFAULT_MAX_TOKENS, plan_sampling, sampling_defaults
from ember.serving.stop import StopMatcher


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


def _request(**fields) -> SimpleNamespace:
    base = dict(temperature=None, top_p=None, top_k=None, seed=None, ignore_eos=False,
                context_length_exceeded_behavior="truncate", requested_max_tokens=None)
    return SimpleNamespace(**{**base, **fields})


def test_sampling_defaults_from_generation_config():
    assert sampling_defaults({"temperature": 0.6, "top_p": 0.9, "max_length": 5}) == {"temperature": 0.6,
                                                                                      "top_p": 0.9}
    assert sampling_defaults({"do_sample": False, "temperature": 0.6}) == {"temperature": 0.0}
    plan = plan_sampling(_request(top_p=0.5), [10], {"temperature": 0.6, "top_p": 0.9}, 8192)
    assert plan.options == {"temperature": 0.6, "top_p": 0.5, "top_k": 0, "max_tokens": DEFAULT_MAX_TOKENS}
    assert plan.params[0].temperature == 0.6 and plan.params[0].top_p == 0.5


def test_max_tokens_fits_each_prompt_or_errors():
    plan = plan_sampling(_request(requested_max_tokens=100), [10, 60], {}, 64)
    assert [p.max_tokens for p in plan.params] == [54, 4]
    with pytest.raises(RequestError) as info:
        plan_sampling(_request(requested_max_tokens=100, context_length_exceeded_behavior="error"), [10], {},
                      64)
    assert info.value.param == "max_tokens"


def test_request_models():
    req = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]], "max_completion_tokens": 3,
                                            "stop": "x", "presence_penalty": 0, "tool_choice": "auto"})
    assert req.requested_max_tokens == 3 and req.stop_list == ["x"] and req.prompt == [[1, 2], [3]]
    msg = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "tool", "content": [{"type": "text", "text": "a"}], "tool_call_id": "7"}]}).messages[0]
    assert msg.for_template() == {"role": "tool", "content": "a", "tool_call_id": "7"}
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "presence_penalty": 0.5})
    assert isinstance(info.value.errors()[0]["ctx"]["error"], NotYetSupported)
