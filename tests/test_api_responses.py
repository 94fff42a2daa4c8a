"""The Responses API against a real server with the `openai` SDK: create (text, items, instructions, a
JSON schema parsed into a pydantic model, function tools), max_output_tokens, stored responses read,
listed, paged and deleted, `previous_response_id` chains served from the prefix cache and surviving a
restart, `store: false`, and bad fields as 400s naming them."""

from __future__ import annotations

from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server import MODEL, launch

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


def _create(client: openai.OpenAI, **kw):
    return client.responses.create(model=MODEL, temperature=0, **{"max_output_tokens": 24, **kw})


def test_text_in_text_out_and_the_same_as_chat(server):
    client = server.client()
    r = _create(client, input="Name three colours.", instructions="Answer briefly.")
    assert r.id.startswith("resp_") and r.output_text
    assert r.output[0].type == "message" and r.output[0].id.startswith("msg_")
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}])
    assert r.output_text == chat.choices[0].message.content  # one template, one engine: the same answer
    assert r.status == {"stop": "completed", "length": "incomplete"}[chat.choices[0].finish_reason]
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_max_output_tokens_makes_it_incomplete(server):
    r = _create(server.client(), input="Tell me a long story.", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


class Colours(BaseModel):
    colours: list[Annotated[str, Field(max_length=10)]] = Field(max_length=2)


def test_a_json_schema_format_parses_into_a_model(server):
    parsed = server.client().responses.parse(model=MODEL, input="List two colours as JSON.", text_format=Colours,
                                             temperature=0, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, Colours)


def test_a_function_tool_round_trip(server):
    client = server.client()
    first = _create(client, input="What is the weather in Paris?", tools=[WEATHER],
                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    assert "city" in call.arguments
    final = _create(client, previous_response_id=first.id, tools=[WEATHER], tool_choice="none",
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert final.status == "completed" and final.output_text
    assert all(item.type == "message" for item in final.output)


def test_a_stream_as_the_sdks_helper_reads_it(server):
    client = server.client()
    with client.responses.stream(model=MODEL, input="Name three colours.", max_output_tokens=300,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and final.status == "completed" and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == deltas  # stored once the stream ended
    unstreamed = _create(client, input="Name three colours.", max_output_tokens=300)
    assert unstreamed.output_text == deltas
    # cut short: the last event says so
    with client.responses.stream(model=MODEL, input="Tell me a long story.", max_output_tokens=5) as stream:
        *_, last = list(stream)
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"


def test_a_streamed_function_call(server):
    with server.client().responses.stream(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (call,) = final.output
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert call.type == "function_call" and call.arguments == deltas and "city" in deltas
    assert [e.type for e in events][-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                                             "response.completed"]


def test_stored_responses_are_read_listed_paged_and_deleted(server):
    client = server.client()
    made = [_create(client, input=f"Say the number {i}.", max_output_tokens=6) for i in range(3)]
    got = client.responses.retrieve(made[1].id)
    assert got.id == made[1].id and got.output_text == made[1].output_text
    (item,) = client.responses.input_items.list(made[1].id).data
    assert item.type == "message" and item.content[0].text == "Say the number 1."
    page = client.get("/responses", cast_to=dict, options={"params": {"limit": 2}})
    assert [r["id"] for r in page["data"]] == [made[2].id, made[1].id] and page["has_more"]
    rest = client.get("/responses", cast_to=dict, options={"params": {"limit": 2, "after": made[1].id}})
    assert rest["data"][0]["id"] == made[0].id
    client.responses.delete(made[1].id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made[1].id)
    with pytest.raises(openai.NotFoundError):
        _create(client, input="Go on.", previous_response_id=made[1].id)
    unstored = _create(client, input="Hello", store=False)
    assert unstored.id is None and unstored.output_text  # Fireworks: nothing stored, so no id


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"temperature": 5}, "temperature"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"previous_response_id": "resp_unknown"}, "previous_response_id"),
])
def test_bad_fields_are_4xx_naming_them(server, fields, param):
    r = server.post("/v1/responses", {"model": MODEL, "input": "hi", **fields})
    assert r.status_code in (400, 404), r.text
    assert param in (r.json()["error"]["param"] or ""), r.json()


def test_a_chain_reuses_the_prefix_cache_and_survives_a_restart(tmp_path):
    data = {"EMBER_DATA_DIR": str(tmp_path / "data")}
    with launch(env=data, log=tmp_path / "one.log") as s:
        client = s.client()
        first = _create(client, input="My name is Ada. Say hello.", max_output_tokens=12)
        second = _create(client, input="What is my name?", previous_response_id=first.id, max_output_tokens=12)
        turn_one = first.usage.input_tokens + first.usage.output_tokens
        assert second.usage.input_tokens_details.cached_tokens >= 0.9 * turn_one - 16  # all but a partial block
    with launch(env=data, log=tmp_path / "two.log") as s:
        client = s.client()
        third = _create(client, input="Say it once more.", previous_response_id=second.id, max_output_tokens=12)
        assert third.output_text and third.usage.input_tokens > second.usage.input_tokens
        assert client.responses.retrieve(first.id).output_text == first.output_text


def test_an_openai_agents_sdk_agent_runs_a_tool_through_ember(server):
    """The openai-agents SDK's default model is the Responses API: an agent with one function tool, the
    call forced (the tiny model would not always choose it), its result the run's final output."""
    import asyncio

    from agents import (
        Agent,
        ModelSettings,
        Runner,
        function_tool,
        set_default_openai_api,
        set_default_openai_client,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    set_default_openai_client(server.aclient(), use_for_tracing=False)
    set_default_openai_api("responses")
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    agent = Agent(name="weather", instructions="Answer with the weather tool.", model=MODEL, tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=48),
                  tool_use_behavior="stop_on_first_tool")
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?"))
    assert len(calls) == 1 and result.final_output == f"sunny in {calls[0]}"
