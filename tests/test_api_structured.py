"""Structured outputs over HTTP (`response_format`): what a client sends in the OpenAI form (json_schema,
as the openai SDK's `parse` writes it from pydantic models), the Fireworks forms (json_object with a
schema, GBNF grammars, through the fireworks-ai SDK) and plain JSON mode comes back parseable and valid,
streamed as whole, mixed with unconstrained requests in one batch without changing them, and bad
formats are 400s naming `response_format`.

A 135M model rarely writes valid JSON unaided, so every check here fails if the constraint is dropped.
Strings are bounded (maxLength) so that answers stay short and the file runs in about a minute.
"""

from __future__ import annotations

import asyncio
import json
from enum import Enum
from typing import Annotated, Literal

import pytest
from fireworks import Fireworks
from pydantic import BaseModel, ConfigDict, Field, conlist

from tests.server import MODEL


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Person(_Closed):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


class Address(_Closed):
    street: str = Field(max_length=25)
    city: str = Field(max_length=20)


class Customer(_Closed):
    name: str = Field(max_length=20)
    address: Address


class ShoppingList(_Closed):
    items: list[Annotated[str, Field(max_length=15)]] = Field(min_length=1, max_length=3)


class Scores(_Closed):
    values: conlist(int, min_length=2, max_length=4)


class Ticket(_Closed):
    title: str = Field(max_length=20)
    priority: Literal["low", "medium", "high"]


class Colour(Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Paint(_Closed):
    colour: Colour
    coats: int = Field(ge=1, le=3)


class Reading(_Closed):
    celsius: float = Field(ge=-50, le=50)
    humidity: int = Field(ge=0, le=100)


class Contact(_Closed):
    name: str = Field(max_length=20)
    email: str | None = Field(default=None, max_length=30)
    age: int | None = Field(default=None, ge=0, le=120)


class City(_Closed):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


class Trip(_Closed):  # City is used twice: the schema has $defs and two $refs
    origin: City
    destination: City


class Category(_Closed):  # recursive: a $ref to itself
    name: str = Field(max_length=15)
    subcategories: list[Category] = Field(max_length=2)


class Card(_Closed):
    kind: Literal["card"]
    last4: str = Field(pattern=r"^[0-9]{4}$")


class Cash(_Closed):
    kind: Literal["cash"]
    amount: int = Field(ge=1, le=1000)


class Payment(_Closed):  # anyOf of two objects
    method: Card | Cash


class Question(_Closed):
    text: str = Field(max_length=30)
    answer: bool


class Quiz(_Closed):
    questions: list[Question] = Field(min_length=1, max_length=2)


PARSE_CASES = [
    (Person, "Describe a person called Ada who is 36."),
    (Customer, "Make up a customer with a postal address."),
    (ShoppingList, "List up to three things to buy for a picnic, one word each."),
    (Scores, "Give me three test scores out of 100."),
    (Ticket, "File a support ticket: the login page is down."),
    (Paint, "Which paint colour should I use for my kitchen, and how many coats?"),
    (Reading, "Report the weather: 21.5 degrees and 40% humidity."),
    (Contact, "Save a contact named Bob."),
    (Trip, "Plan a trip from Paris to Rome."),
    (Category, "A category named Apple, with an empty list of subcategories."),
    (Payment, "I paid 20 dollars in cash."),
    (Quiz, "Write one true-or-false question about the sun."),
]


def _chat(content: str) -> list[dict]:
    return [{"role": "user", "content": f"{content} Answer in JSON."}]


def _schema_format(model: type[BaseModel]) -> dict:
    """The OpenAI form, as a hand-written client would send it."""
    return {"type": "json_schema",
            "json_schema": {"name": model.__name__, "schema": model.model_json_schema(), "strict": True}}


@pytest.mark.parametrize("model,ask", PARSE_CASES, ids=[m.__name__ for m, _ in PARSE_CASES])
def test_openai_parse_gives_an_instance_of_the_model(server, model, ask):
    resp = server.client().chat.completions.parse(model=MODEL, messages=_chat(ask), response_format=model,
                                                  temperature=0, max_tokens=200)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, model)
    # the SDK validates leniently; the text must also pass strict validation (no "5" for 5)
    assert model.model_validate_json(choice.message.content, strict=True) == choice.message.parsed


JSON_ASKS = ["Give me a JSON object about a car.", "What is the capital of France? Reply in JSON."]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_object_mode_answers_are_objects(server, path):
    """Free JSON mode at temperature 1: an object may be cut off by max_tokens (finish "length"), but every
    answer that ended by itself parses to a dict, and most do end (16 seeded samples, so that "most" does not
    hang on one sample's luck)."""
    finished = total = 0
    for seed, ask in enumerate(JSON_ASKS, start=1):
        prompt = {"messages": [{"role": "user", "content": ask}]} if "chat" in path else {"prompt": f"{ask}\n"}
        r = server.post(path, {"model": MODEL, **prompt, "response_format": {"type": "json_object"}, "n": 8,
                               "seed": seed, "temperature": 1, "max_tokens": 400})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            text = choice["message"]["content"] if "chat" in path else choice["text"]
            total += 1
            assert text.lstrip()[:1] == "{", text
            if choice["finish_reason"] == "stop":
                finished += 1
                assert isinstance(json.loads(text), dict), text
    assert finished > 0.5 * total, f"{finished} of {total} finished"


def test_json_object_with_a_schema_is_valid(server):
    """The Fireworks form: `{"type": "json_object", "schema": ...}`."""
    r = server.post("/v1/chat/completions", {
        "model": MODEL, "messages": _chat("Describe a person."), "n": 4, "seed": 1, "temperature": 1,
        "max_tokens": 100, "response_format": {"type": "json_object", "schema": Person.model_json_schema()}})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        Person.model_validate_json(choice["message"]["content"], strict=True)


YES_NO = 'root ::= ("yes" | "no")'


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_gbnf_grammar_allows_only_its_words(server, path):
    prompt = ({"messages": [{"role": "user", "content": "Is the sky green? Explain at length."}]} if "chat" in path
              else {"prompt": "Is the sky green? Explain at length.\n"})
    r = server.post(path, {"model": MODEL, **prompt, "n": 8, "seed": 11, "temperature": 1.5, "max_tokens": 16,
                           "response_format": {"type": "grammar", "grammar": YES_NO}})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    texts = [c["message"]["content"] if "chat" in path else c["text"] for c in choices]
    assert len(texts) == 8 and set(texts) <= {"yes", "no"}, texts
    assert {c["finish_reason"] for c in choices} == {"stop"}


def test_fireworks_sdk_grammar_and_json_object_schema(server):
    fw = Fireworks(api_key="unused", base_url=f"{server.url}/inference", max_retries=0)
    name = f"accounts/fireworks/models/{MODEL}"
    resp = fw.chat.completions.create(model=name, messages=[{"role": "user", "content": "Pick a colour."}],
                                      max_tokens=8, temperature=1, seed=2, n=4,
                                      response_format={"type": "grammar", "grammar": 'root ::= "red" | "blue"'})
    assert {c.message.content for c in resp.choices} <= {"red", "blue"}
    done = fw.completions.create(model=name, prompt="The answer is", max_tokens=8, temperature=0,
                                 response_format={"type": "grammar", "grammar": 'root ::= [0-9] [0-9]'})
    assert len(done.choices[0].text) == 2 and done.choices[0].text.isdigit()
    person = fw.chat.completions.create(
        model=name, messages=_chat("Describe a person."), max_tokens=100, temperature=0,
        response_format={"type": "json_object", "schema": Person.model_json_schema()})
    Person.model_validate_json(person.choices[0].message.content, strict=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in fw.chat.completions.create(
        model=name, messages=_chat("Describe a person."), max_tokens=100, temperature=0, stream=True,
        response_format={"type": "json_object", "schema": Person.model_json_schema()}) if c.choices)
    assert streamed == person.choices[0].message.content


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_json_schema_equals_the_whole_answer(server, path):
    prompt = {"messages": _chat("Plan a trip.")} if "chat" in path else {"prompt": "A trip, as JSON:"}
    body = {"model": MODEL, **prompt, "temperature": 0, "max_tokens": 150, "response_format": _schema_format(Trip)}
    r = server.post(path, body)
    assert r.status_code == 200, r.text
    whole = r.json()["choices"][0]
    text = whole["message"]["content"] if "chat" in path else whole["text"]
    chunks = server.stream(path, body)
    if "chat" in path:
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    else:
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == text
    Trip.model_validate_json(text, strict=True)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["finish_reason"] == "stop"


def test_constrained_and_plain_requests_in_one_batch(server):
    """Four schema-constrained and four plain requests at once: the constrained are valid, and the plain
    ones say exactly what they say alone (a grammar mask must not leak onto a neighbour's row)."""
    plain_asks = ["Tell me about rivers.", "Write a haiku about snow.", "Why do cats purr?", "Name a planet."]
    models = [Person, Ticket, Trip, Reading]
    client = server.client()
    kw = dict(model=MODEL, temperature=0, max_tokens=24)
    alone = [client.chat.completions.create(messages=[{"role": "user", "content": a}], **kw).choices[0].message.content
             for a in plain_asks]

    async def main():
        aclient = server.aclient()
        plain = [aclient.chat.completions.create(messages=[{"role": "user", "content": a}], **kw)
                 for a in plain_asks]
        shaped = [aclient.chat.completions.create(messages=_chat(f"Make up a {m.__name__.lower()}."),
                                                  response_format=_schema_format(m), model=MODEL, temperature=0,
                                                  max_tokens=150) for m in models]
        mixed = [c for pair in zip(plain, shaped, strict=True) for c in pair]
        return await asyncio.gather(*mixed)

    replies = asyncio.run(main())
    assert [r.choices[0].message.content for r in replies[0::2]] == alone
    for model, reply in zip(models, replies[1::2], strict=True):
        assert reply.choices[0].finish_reason == "stop"
        model.model_validate_json(reply.choices[0].message.content, strict=True)
    assert server.wait_idle()["max_batch_seqs"] > 1


BAD_FORMATS = [
    pytest.param({"type": "xml"}, id="unknown type"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                 id="bad schema"),
    pytest.param({"type": "json_object", "schema": {"type": "nonsense"}}, id="bad fireworks schema"),
    pytest.param({"type": "json_object", "schema": [1, 2]}, id="fireworks schema not an object"),
    pytest.param({"type": "json_schema", "json_schema": "{not json"}, id="schema text not json"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}},
                 id="schema not an object"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "colour": "red"}},
                 id="unknown json_schema field"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x"}}, id="json_schema without schema"),
    pytest.param({"type": "json_schema"}, id="json_schema missing"),
    pytest.param({"type": "grammar", "grammar": 'root ::= ("yes" | '}, id="bad gbnf"),
    pytest.param({"type": "grammar"}, id="grammar missing"),
    pytest.param("json_object", id="not an object"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_bad_response_formats_are_400s(server, path, fmt):
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    for stream in (False, True):
        r = server.post(path, {"model": MODEL, **prompt, "max_tokens": 4, "response_format": fmt, "stream": stream})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["message"]
        assert error["param"].startswith("response_format"), error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_raw_output_shows_the_grammar_only_when_constrained(server, path):
    prompt = {"messages": [{"role": "user", "content": "Yes or no?"}]} if "chat" in path else {"prompt": "Yes or no?"}
    body = {"model": MODEL, **prompt, "max_tokens": 4, "temperature": 0, "raw_output": True}
    for fmt in ({"type": "grammar", "grammar": YES_NO}, _schema_format(Person), {"type": "json_object"}):
        r = server.post(path, {**body, "response_format": fmt})  # cut short or not, the grammar is shown
        assert r.status_code == 200, r.text
        grammar = r.json()["choices"][0]["raw_output"]["grammar"]
        assert isinstance(grammar, str) and grammar, fmt
    for plain in (body, {**body, "response_format": {"type": "text"}}):
        r = server.post(path, plain)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["raw_output"]["grammar"] is None
    chunks = server.stream(path, {**body, "response_format": {"type": "grammar", "grammar": YES_NO}})
    last = next(c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert isinstance(last["raw_output"]["grammar"], str) and last["raw_output"]["grammar"]
