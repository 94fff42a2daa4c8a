"""POST /v1/completions: prompt forms, streaming, stop strings, context fitting, sampling defaults."""

from __future__ import annotations

import json

import pytest
from fireworks import Fireworks

from tests.server import MODEL, TINY_BLOCK_SIZE, TINY_GENERATION_CONFIG, TINY_KV_BLOCKS

PROMPT = "The three primary colours are"


def test_stream_equals_non_stream_at_temperature_zero(server):
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0)
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text != ""
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_prompt_forms_are_choice_groups(server, tokenizer):
    client = server.client()
    kw = dict(model=MODEL, max_tokens=4, temperature=0)
    single = client.completions.create(prompt="The sky is", **kw)
    several = client.completions.create(prompt=["Hello", "The sky is"], **kw)
    assert [c.index for c in sorted(several.choices, key=lambda c: c.index)] == [0, 1]
    assert next(c.text for c in several.choices if c.index == 1) == single.choices[0].text
    ids = tokenizer.encode("The sky is")
    by_ids = client.completions.create(prompt=ids, **kw)
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.choices[0].text == single.choices[0].text
    lists = client.completions.create(prompt=[ids, ids[:1]], n=2, **kw)
    assert sorted(c.index for c in lists.choices) == [0, 1, 2, 3]  # prompt i -> choices 2i, 2i+1
    assert lists.usage.prompt_tokens == len(ids) + 1
    assert [c.text for c in lists.choices if c.index < 2] == [single.choices[0].text] * 2


def test_list_prompt_streams_every_choice(server):
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in server.client().completions.create(model=MODEL, prompt=["One,", "Two,"], max_tokens=4,
                                                    temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert sorted(texts) == sorted(reasons) == [0, 1]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_stays_and_nothing_follows(server, stream):
    client = server.client()
    kw = dict(model=MODEL, prompt="1, 2, 3, 4, 5, 6,", max_tokens=24, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    assert " 8," in free, free  # the model counts on
    if stream:
        chunks = list(client.completions.create(**kw, stop=" 8", stream=True))
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        resp = client.completions.create(**kw, stop=[" 8"])
        text, reason = resp.choices[0].text, resp.choices[0].finish_reason
    assert text == free[:free.index(" 8") + 2] and reason == "stop"


def test_fireworks_sdk_completions(server):
    fw = Fireworks(api_key="unused", base_url=f"{server.url}/inference", max_retries=0)
    resp = fw.completions.create(model=f"accounts/fireworks/models/{MODEL}", prompt=PROMPT, max_tokens=6,
                                 temperature=0)
    same = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert resp.choices[0].text == same.choices[0].text


def test_max_tokens_is_lowered_to_fit_the_context(tiny_server, tokenizer):
    window = TINY_KV_BLOCKS * TINY_BLOCK_SIZE
    prompt = tokenizer.encode("word " * 400)[:window - 10]
    raw = tiny_server.client().completions.with_raw_response.create(
        model=tiny_server.model, prompt=prompt, max_tokens=1000, temperature=0,
        extra_body={"ignore_eos": True})
    body = raw.parse()
    assert body.usage.completion_tokens == 10 and body.choices[0].finish_reason == "length"
    assert json.loads(raw.headers["fireworks-sampling-options"])["max_tokens"] == 10


def test_generation_config_sets_the_defaults(tiny_server):
    client = tiny_server.client()
    raw = client.completions.with_raw_response.create(model=tiny_server.model, prompt=PROMPT, max_tokens=1)
    assert json.loads(raw.headers["fireworks-sampling-options"]) == {
        "top_p": 1.0, "typical_p": 1.0, **TINY_GENERATION_CONFIG, "max_tokens": 1}
    raw = client.completions.with_raw_response.create(model=tiny_server.model, prompt=PROMPT, max_tokens=1,
                                                      temperature=0, extra_body={"top_k": 0})
    options = json.loads(raw.headers["fireworks-sampling-options"])
    assert options["temperature"] == 0 and options["top_k"] == 0
