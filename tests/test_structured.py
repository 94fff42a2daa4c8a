"""Constrained decoding in the engine with the bundled model: every constrained output is valid, the
unconstrained neighbours of a batch are untouched, and the tool-call stream parser is exact."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ember.engine.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams
from ember.models.loader import default_model_path, load_model
from ember.models.tokenizer import IncrementalDetokenizer
from ember.serving.tools import Tool, ToolCallParser, format_call, prepare_messages, tool_grammar
from ember.structured.backend import GrammarError, GrammarSpec, unpack_bitmask
from ember.structured.llguidance_backend import LLGuidanceBackend

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
TOOLS = [Tool("get_weather", {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                              "properties": {"city": {"type": "string", "maxLength": 30},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}}}, "Current weather"),
         Tool("add", {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                      "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}, "Adds two numbers")]


@pytest.fixture(scope="module")
def model():
    weights, tokenizer = load_model(default_model_path(), torch.float32)
    engine = LLMEngine(EngineConfig(), weights, tokenizer.eos_token_ids)
    return engine, tokenizer, LLGuidanceBackend(tokenizer, weights.config.vocab_size, tokenizer.eos_token_ids)


def _prompt(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out: dict[tuple[str, int], list[int]] = {}
    reasons = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault((o.request_id, o.index), []).extend(o.token_ids)
            if o.finished:
                reasons[o.request_id, o.index] = o.finish_reason
    assert engine.stats()["kv_blocks_used"] == 0
    return {k: (v, reasons[k]) for k, v in out.items()}


def test_compiles_once_per_distinct_grammar_and_rejects_bad_ones(model):
    _, _, backend = model
    spec = GrammarSpec("json_schema", json.dumps(PERSON))
    assert backend.compile(spec) is backend.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    for bad in (GrammarSpec("json_schema", '{"type": "banana"}'), GrammarSpec("json_schema", "{not json"),
                GrammarSpec("gbnf", 'root ::= ("yes" | '), GrammarSpec("lark", "start: undefined_rule"),
                GrammarSpec("regex", "(unclosed")):
        with pytest.raises(GrammarError):
            backend.compile(bad)


def test_constrained_and_free_requests_share_a_batch(model):
    engine, tokenizer, backend = model
    person = backend.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    yes_no = backend.compile(GrammarSpec("gbnf", 'root ::= ("yes" | "no")'))
    asks = ["Describe a person as JSON.", "Is water wet?"]
    prompts = [_prompt(tokenizer, [{"role": "user", "content": a}]) for a in asks]
    free = SamplingParams(temperature=0, max_tokens=24)
    requests = {f"free{i}": (p, free) for i, p in enumerate(prompts)}
    alone = {k: v for rid, req in requests.items() for k, v in _run(engine, {rid: req}).items()}
    requests |= {f"person{i}": (p, SamplingParams(temperature=1.0, seed=i, max_tokens=120, grammar=person, n=2))
                 for i, p in enumerate(prompts)}
    requests |= {f"yn{i}": (p, SamplingParams(temperature=1.5, seed=i, max_tokens=8, grammar=yes_no))
                 for i, p in enumerate(prompts)}
    results = _run(engine, requests)
    for (rid, index), (tokens, reason) in results.items():
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if rid.startswith("free"):
            assert (tokens, reason) == alone[rid, index]  # untouched by constrained neighbours
        elif rid.startswith("yn"):
            assert text in ("yes", "no") and reason == "stop"
        else:
            assert reason == "stop", text  # ended by the grammar, not by max_tokens
            value = json.loads(text)
            assert set(value) == {"name", "age", "tags"} and 0 <= value["age"] <= 120
            assert len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"}


@pytest.mark.parametrize("choice,function", [("required", None), ("function", "add"), ("auto", None)])
def test_tool_grammar_yields_valid_calls(model, choice, function):
    engine, tokenizer, backend = model
    grammar = backend.compile(tool_grammar(TOOLS, choice, parallel=False, function=function))
    prompt = _prompt(tokenizer, prepare_messages([{"role": "user", "content": "Weather in Paris, please."}], TOOLS))
    results = _run(engine, {"t": (prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=100, grammar=grammar,
                                                         n=4))})
    by_name = {t.name: t for t in TOOLS}
    for tokens, reason in results.values():
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        parser = ToolCallParser()
        content, _ = parser.feed(text)
        parser.finish()
        if choice == "auto" and not text.startswith("<"):
            assert content == text and not parser.calls
            continue
        assert reason == "stop" and content == "" and len(parser.calls) == 1 and parser.called, text
        call = parser.calls[0]
        assert call.name in by_name and call.name == (function or call.name)
        arguments = json.loads(call.arguments)
        assert set(arguments) == set(by_name[call.name].parameters["required"])


def test_streamed_tool_deltas_concatenate_to_the_calls_whatever_the_chunking():
    text = (format_call("get_weather", '{"city": "Paris}\\n</tool_call>", "unit": "celsius"}') + "\n"
            + format_call("add", '{"a": 1, "b": {"c": [2]}}'))
    whole = ToolCallParser()
    assert whole.feed(text)[0] == ""
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [
        ("get_weather", {"city": "Paris}\n</tool_call>", "unit": "celsius"}), ("add", {"a": 1, "b": {"c": [2]}})]
    for size in (1, 2, 3, 5, 8, 13):
        parser = ToolCallParser()
        deltas = [d for i in range(0, len(text), size) for d in parser.feed(text[i:i + size])[1]] + parser.finish()
        starts = [d for d in deltas if d.id is not None]
        assert [(d.index, d.name) for d in starts] == [(0, "get_weather"), (1, "add")]
        assert all(d.name is None for d in deltas if d.id is None)
        for i, call in enumerate(whole.calls):
            assert "".join(d.arguments for d in deltas if d.index == i) == call.arguments


def test_text_answers_pass_through_and_past_calls_render_back():
    parser = ToolCallParser()
    assert parser.feed("Sunny, ")[0] == "Sunny, " and parser.feed("<b>")[0] == "<b>" and not parser.calls
    messages = prepare_messages([
        {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ], TOOLS)
    assert messages[0]["role"] == "system" and '"name": "add"' in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": format_call("add", '{"a": 1, "b": 2}')}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}


def test_incremental_detokenization_feeds_the_parser_exactly(model):
    """The streamed path: token by token through the detokenizer into the parser."""
    engine, tokenizer, backend = model
    grammar = backend.compile(tool_grammar(TOOLS, "required", parallel=True))
    prompt = _prompt(tokenizer, prepare_messages([{"role": "user", "content": "Add 2 and 40."}], TOOLS))
    ((tokens, _),) = _run(engine, {"s": (prompt, replace(SamplingParams(), temperature=0, max_tokens=80,
                                                             grammar=grammar))}).values()
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True, prefix_ids=prompt)
    parser = ToolCallParser()
    deltas = [d for t in tokens for d in parser.feed(detok.add([t]))[1]]
    deltas += parser.feed(detok.flush())[1] + parser.finish()
    whole = ToolCallParser()
    whole.feed(tokenizer.decode(tokens, skip_special_tokens=True))
    assert [c.name for c in parser.calls] == [c.name for c in whole.calls]
    for i, call in enumerate(whole.calls):
        assert "".join(d.arguments for d in deltas if d.index == i) == call.arguments


def test_unpack_bitmask_reads_bit_i_of_word_w_as_token_32w_plus_i():
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    expected = [[bool(int(bitmask[r, t // 32]) >> (t % 32) & 1) for t in range(100)] for r in range(3)]
    assert unpack_bitmask(bitmask, 100).tolist() == expected
