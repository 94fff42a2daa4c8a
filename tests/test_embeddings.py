"""POST /v1/embeddings on a real `ember serve --model <BERT folder>` through the `openai` SDK: parity with
sentence-transformers' all-MiniLM-L6-v2 (its pooling and Normalize computed over transformers' BertModel, as
sentence-transformers defines them: it cannot be imported here without scipy), base64 against float, Matryoshka
`dimensions`, token ids against text, 400s naming the field, chat refused, concurrent requests sharing forward
passes, a batch job of embedding lines, and the usage rows."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from ember.models.loader import minilm_model_path
from tests.server import Server, launch
from tests.test_api_batches import jsonl, run_batch
from tests.test_api_usage import _rows

MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors; similar meanings land close together.",
    "Ünïcödé, emoji 🎉 and 漢字 go through WordPiece too.",
    " ".join(["A longer passage that repeats itself to fill many positions."] * 18),  # ~200 tokens
    "short",
    "Paris is the capital of France, and Berlin is the capital of Germany; Rome is Italy's.",
]


@pytest.fixture(scope="module")
def folder() -> Path:
    return minilm_model_path()


@pytest.fixture(scope="module")
def srv(folder, tmp_path_factory) -> Iterator[Server]:
    with launch("--model", str(folder), model=MODEL,
                log=tmp_path_factory.mktemp("ember-embeddings") / "serve.log") as s:
        yield s


@pytest.fixture(scope="module")
def reference(folder) -> dict[str, np.ndarray]:
    """sentence-transformers' Transformer -> Pooling(mean) -> Normalize, one input at a time (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    vectors = {}
    with torch.no_grad():
        for text in SENTENCES:
            features = tokenizer([text], return_tensors="pt")
            hidden = model(**features).last_hidden_state
            mask = features["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors[text] = torch.nn.functional.normalize(pooled, p=2, dim=1)[0].numpy()
    return vectors


def embed(srv: Server, path: str = "/v1/embeddings", **body) -> httpx.Response:
    return srv.post(path, {"model": MODEL, **body})


def floats(srv: Server, text: str | list, **body) -> np.ndarray:
    r = embed(srv, input=text, encoding_format="float", **body)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_parity_with_sentence_transformers(srv, reference, folder):
    answer = srv.client().embeddings.create(model=MODEL, input=SENTENCES)
    assert [d.index for d in answer.data] == list(range(len(SENTENCES)))
    worst = min(cosine(np.array(d.embedding), reference[t]) for d, t in zip(answer.data, SENTENCES, strict=True))
    assert worst >= 0.99999, worst
    for d in answer.data:
        assert len(d.embedding) == 384 and abs(np.linalg.norm(d.embedding) - 1) < 1e-5
    tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(str(folder))(SENTENCES)["input_ids"])
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens
    assert answer.model == MODEL


def test_base64_equals_float(srv):
    r = embed(srv, input=SENTENCES[:3], encoding_format="base64")
    assert r.status_code == 200, r.text
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    np.testing.assert_array_equal(decoded, floats(srv, SENTENCES[:3]))


def test_dimensions_truncate_and_renormalize(srv):
    full = floats(srv, SENTENCES[2])[0]
    short = floats(srv, SENTENCES[2], dimensions=64)[0]
    assert short.shape == (64,) and abs(np.linalg.norm(short) - 1) < 1e-6
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    sdk = srv.client().embeddings.create(model=MODEL, input=SENTENCES[2], dimensions=64)
    np.testing.assert_allclose(sdk.data[0].embedding, short, atol=1e-7)


def test_token_ids_equal_text_and_fireworks_route(srv, folder):
    ids = AutoTokenizer.from_pretrained(str(folder))(SENTENCES[:3])["input_ids"]
    text = floats(srv, SENTENCES[:3])
    np.testing.assert_allclose(floats(srv, ids), text, atol=1e-6)
    np.testing.assert_allclose(floats(srv, ids[1])[0], text[1], atol=1e-6)
    r = embed(srv, "/inference/v1/embeddings", input=SENTENCES[1], normalize=True, user="u",
              prompt_cache_isolation_key="k")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], text[1], atol=1e-6)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": ["x"] * 2049}, "input"),
    ({"input": "word " * 600}, "input"),  # 602 tokens > 512 positions
    ({"input": [[101, 30522, 102]]}, "input"),  # past the vocabulary
    ({"input": [[]]}, "input[0]"),
    ({"input": "x", "dimensions": 385}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "colour": "blue"}, "colour"),
    ({"input": "x", "return_logits": [0, 1]}, "return_logits"),
    ({"input": {"title": "x"}}, "input"),  # an object needs a template
    ({"input": [[101, 102]], "prompt_template": "{text}"}, "prompt_template"),  # token ids fill no template
    ({"input": {"title": "x"}, "prompt_template": "Title: {name}"}, "prompt_template"),  # no such field
    ({"input": "x", "prompt_template": "{% if %}"}, "prompt_template"),  # does not compile
    ({"input": "x", "prompt_template": "{% if false %}{text}{% endif %}"}, "prompt_template"),  # renders empty
])
def test_bad_inputs_name_the_field(srv, body, param):
    r = embed(srv, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_prompt_template_fills_strings_and_objects(srv, reference):
    """Fireworks' prompt_template: a string is `{text}`, an object's fields are theirs (simple `{field}` or full
    Jinja2); the vectors are those of the rendered text; truncate_tokens cuts by the model's tokens."""
    text = SENTENCES[1]
    for body in ({"input": text, "prompt_template": "{text}"},
                 {"input": [{"a": "The quick brown fox", "b": "jumps over the lazy dog."}],
                  "prompt_template": "{a} {{ b }}"}):
        r = embed(srv, **body)
        assert r.status_code == 200, r.text
        assert cosine(np.array(r.json()["data"][0]["embedding"]), reference[text]) >= 0.99999
    long = "word " * 2000
    r = embed(srv, input=[{"body": long}], prompt_template="{{ truncate_tokens(body) }}")
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 512, r.text  # the model's 512 positions
    r = embed(srv, input=long, prompt_template="{{ truncate_tokens(text, 10) }}")
    assert r.json()["usage"]["prompt_tokens"] == 12  # [CLS] + 10 + [SEP]


def test_embedding_model_does_not_chat_and_lists_its_capabilities(srv):
    client = srv.client()
    with pytest.raises(openai.BadRequestError, match="only embeds"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only embeds"):
        client.completions.create(model=MODEL, prompt="hi")
    card = client.models.retrieve(MODEL).model_dump()
    assert card["capabilities"] == ["embeddings"] and card["dimensions"] == 384 and card["context_length"] == 512
    assert [m.id for m in client.models.list()] == [MODEL]


def test_concurrent_requests_share_forward_passes(srv, reference):
    """A large request (two passes of MAX_BATCH_TOKENS) keeps the engine busy while fourteen small ones arrive:
    they wait together and share passes, instead of one pass each."""
    before = srv.stats()
    small = SENTENCES * 2  # requests of one input each

    async def run() -> list:
        client = srv.aclient()
        big = asyncio.create_task(client.embeddings.create(model=MODEL, input=[SENTENCES[2]] * 600))
        await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(client.embeddings.create(model=MODEL, input=t) for t in small))
        await big
        return answers

    answers = asyncio.run(run())
    after = srv.stats()
    requests = after["requests"] - before["requests"]
    assert requests == len(small) + 1 and after["inputs"] - before["inputs"] == len(small) + 600
    steps = after["steps"] - before["steps"]
    assert steps <= 4, (steps, requests)  # the large request's two, then the small ones together
    for text, answer in zip(small, answers, strict=True):
        assert cosine(np.array(answer.data[0].embedding), reference[text]) >= 0.99999
    metrics = httpx.get(f"{srv.url}/metrics").text  # the embedding engine's counters, without the KV gauges
    assert f'ember_engine_steps_total{{model="{MODEL}"}} {after["steps"]}.0' in metrics
    assert f'ember_requests_total{{endpoint="embeddings",model="{MODEL}",status="200"}}' in metrics
    assert f'ember_kv_blocks_total{{model="{MODEL}"}}' not in metrics


def test_batch_job_of_embedding_lines(srv):
    client = srv.client()
    bodies = [{"model": MODEL, "input": t, "encoding_format": "float"} for t in SENTENCES[:4]]
    _, lines = run_batch(client, jsonl(bodies, "/v1/embeddings"), "/v1/embeddings")
    got = {line["custom_id"]: line["response"] for line in lines}
    live = floats(srv, SENTENCES[:4])
    for i in range(4):
        assert got[f"req-{i}"]["status_code"] == 200
        np.testing.assert_allclose(got[f"req-{i}"]["body"]["data"][0]["embedding"], live[i], atol=1e-6)


def test_usage_rows(folder, tmp_path):
    data = tmp_path / "data"
    with launch("--model", str(folder), model=MODEL, env={"EMBER_DATA_DIR": str(data)},
                log=tmp_path / "serve.log") as s:
        answer = s.client().embeddings.create(model=MODEL, input=["a b", "c"], user="alice")
        assert embed(s, input="").status_code == 400
    rows = [r for r in _rows(data) if r["endpoint"] == "embeddings"]
    assert [(r["status"], r["model"]) for r in rows] == [(200, MODEL), (400, MODEL)]
    assert rows[0]["prompt_tokens"] == answer.usage.prompt_tokens and rows[0]["user"] == "alice"
    assert rows[1]["error_type"] == "invalid_request_error"
