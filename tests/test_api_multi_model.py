"""Several models in one `ember serve`: two chat models (SmolLM2 and Gemma 3) and the embedding model from one
--config file, each answering by its id, concurrently, with its own engine settings; a chat model asked for
embeddings (last-token pooling over its own weights) through the `openai` SDK; and how --model and the config file
are read."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from ember.api.config import ServerConfig
from ember.cli import config_file_specs, config_from_args, model_specs, serve_parser
from ember.engine.config import EngineConfig
from ember.models.decoder_encoder import DecoderEncoder
from ember.models.llama import LlamaModel
from ember.models.loader import load_model
from ember.serving.models import model_path
from tests.server import Server, launch

CHAT, GEMMA, ENCODER = "smollm2-135m-instruct", "gemma", "all-minilm-l6-v2"
CONFIG = f"""
[engine]
max_num_seqs = 16

[models.{CHAT}]
max_model_len = 4096
kv_cache_memory_mb = 192

[models.{GEMMA}]
path = "gemma-3-270m-it"
max_model_len = 2048
kv_cache_memory_mb = 96
max_num_seqs = 8

[models.{ENCODER}]
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("ember-multi")
    (folder / "ember.toml").write_text(CONFIG)
    with launch("--config", str(folder / "ember.toml"), model=CHAT, log=folder / "serve.log") as s:
        yield s


def test_models_lists_each_with_capabilities_and_context(srv):
    cards = {m["id"]: m for m in httpx.get(f"{srv.url}/v1/models").json()["data"]}
    assert list(cards) == [CHAT, GEMMA, ENCODER]
    assert cards[CHAT]["context_length"] == 4096 and cards[GEMMA]["context_length"] == 2048
    assert cards[ENCODER]["context_length"] == 512 and cards[ENCODER]["capabilities"] == ["embeddings"]
    assert cards[GEMMA]["capabilities"] == ["chat", "completions", "embeddings"]


def test_each_model_has_its_own_engine_settings(srv):
    stats = httpx.get(f"{srv.url}/v1/engine/stats").json()
    assert set(stats) == {CHAT, GEMMA, ENCODER}
    assert stats[CHAT]["max_num_seqs"] == 16 and stats[GEMMA]["max_num_seqs"] == 8
    assert stats[CHAT]["kv_blocks_total"] != stats[GEMMA]["kv_blocks_total"]  # their own KV budgets


def test_concurrent_requests_are_routed_by_model(srv):
    """Chat on both models and embeddings at once: each answer comes from the model it named."""
    client = srv.aclient()

    async def chat(model: str, i: int):
        return await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=12, temperature=0)

    async def main():
        return await asyncio.gather(*(chat(m, i) for i in range(4) for m in (CHAT, GEMMA)),
                                    client.embeddings.create(model=ENCODER, input=["one", "two"]))

    *answers, embedded = asyncio.run(main())
    assert [a.model for a in answers] == [CHAT, GEMMA] * 4
    assert all(a.usage.completion_tokens > 0 and a.choices[0].message.content for a in answers)
    # the same prompt, greedy: the two models say different things (so neither answered for the other)
    assert answers[0].choices[0].message.content != answers[1].choices[0].message.content
    assert [len(d.embedding) for d in embedded.data] == [384, 384]
    stats = httpx.get(f"{srv.url}/v1/engine/stats").json()
    assert stats[CHAT]["requests"] >= 4 and stats[GEMMA]["requests"] >= 4


def test_model_context_is_enforced_per_model(srv):
    long = "word " * 3000  # fits SmolLM2's 4,096 positions here, not Gemma's 2,048
    r = srv.post("/v1/chat/completions", {"model": GEMMA, "messages": [{"role": "user", "content": long}],
                                          "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = srv.post("/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": long}],
                                          "max_tokens": 1})
    assert r.status_code == 200


def test_chat_model_embeds_with_last_token_pooling(srv):
    """A chat model's embeddings through the openai SDK: its final hidden state at the input's last token,
    normalized (vLLM's pooling for decoders), as the model computes it outside the server; base64 equals float;
    `dimensions` truncates and renormalizes."""
    client, texts = srv.client(), ["The cat sat on the mat.", "Embeddings from a decoder", "x"]
    got = client.embeddings.create(model=CHAT, input=texts)
    vectors = np.array([d.embedding for d in got.data])
    weights, tokenizer = load_model(model_path(CHAT), torch.float32, packed=True)  # as the server runs it
    encoder = DecoderEncoder(LlamaModel(weights.config, weights.tensors, torch.device("cpu"), torch.float32), 8192)
    expected = encoder.encode([tokenizer.encode(t) for t in texts]).numpy()
    cosine = (vectors * expected).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    assert vectors.shape == (3, 576) and cosine.min() > 0.9999, cosine
    assert got.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    raw = httpx.post(f"{srv.url}/v1/embeddings", json={"model": CHAT, "input": texts,
                                                       "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.float32) for d in raw["data"]])
    assert np.array_equal(decoded, vectors.astype(np.float32))
    short = np.array(client.embeddings.create(model=CHAT, input=texts, dimensions=64).data[0].embedding)
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1) < 1e-5
    r = srv.post("/v1/embeddings", {"model": CHAT, "input": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_unknown_model_is_a_404_naming_the_served_ones(srv):
    r = srv.post("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert all(name in r.json()["error"]["message"] for name in (CHAT, GEMMA, ENCODER))


def _specs(*argv: str) -> list:
    args = serve_parser().parse_args(list(argv))
    return model_specs(args, config_from_args(ServerConfig, args))


def test_model_flags():
    specs = _specs("--model", "a=/x/a.gguf", "--model", "/y/Bee.gguf", "--model", CHAT, "--max-num-seqs", "4")
    assert [(s.name, s.engine.model, s.engine.max_num_seqs) for s in specs] == \
        [("a", "/x/a.gguf", 4), ("bee", "/y/Bee.gguf", 4), (CHAT, CHAT, 4)]
    assert [s.name for s in _specs()] == [CHAT, ENCODER]  # the defaults: chat and embeddings
    assert [s.name for s in _specs("--served-model-name", "mine")] == ["mine", ENCODER]
    with pytest.raises(ValueError, match="two models"):
        _specs("--model", "a=/x.gguf", "--model", "a=/y.gguf")
    with pytest.raises(ValueError, match="names one model"):
        _specs("--model", "/x.gguf", "--model", "/y.gguf", "--served-model-name", "z")


def test_config_file(tmp_path):
    path = tmp_path / "ember.toml"
    path.write_text(CONFIG)
    specs = {s.name: s for s in config_file_specs(str(path), EngineConfig(max_num_seqs=3))}
    assert specs[GEMMA].engine.model == "gemma-3-270m-it" and specs[GEMMA].engine.max_num_seqs == 8
    assert specs[CHAT].engine.model == CHAT and specs[CHAT].engine.max_num_seqs == 16  # [engine] over the flags
    path.write_text(textwrap.dedent("""
        [models.a]
        path = "/x.gguf"
        max_num_seq = 3
    """))
    with pytest.raises(ValueError, match=r"unknown settings \['max_num_seq'\]"):
        config_file_specs(str(path), EngineConfig())
    path.write_text("[server]\nport = 1\n")
    with pytest.raises(ValueError, match="expected"):
        config_file_specs(str(path), EngineConfig())


def test_bad_model_flag_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "ember.cli", "serve", "--model", "=x"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "expected NAME=PATH" in done.stderr
