"""Model listing, health, the stats endpoint, and the CLI's configuration plumbing."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from ember.api.config import ServerConfig
from ember.cli import add_config_flags, config_from_args, serve_parser
from ember.engine.config import EngineConfig
from tests.server import MODEL

EMBEDDING_MODEL = "all-minilm-l6-v2"


def test_health(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("prefix", ["/v1", "/inference/v1"])
def test_models_list_and_get(server, prefix):
    """`ember serve` without --model serves the bundled chat model and the bundled embedding model."""
    listed = httpx.get(f"{server.url}{prefix}/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [MODEL, EMBEDDING_MODEL]
    chat, encoder = listed["data"]
    assert chat["object"] == "model" and chat["context_length"] == 8192
    assert chat["capabilities"] == ["chat", "completions", "embeddings"]
    assert encoder["capabilities"] == ["embeddings"] and encoder["context_length"] == 512
    assert encoder["dimensions"] == 384
    for name in (MODEL, f"accounts/fireworks/models/{MODEL}"):
        assert httpx.get(f"{server.url}{prefix}/models/{name}").json()["id"] == MODEL
    assert httpx.get(f"{server.url}{prefix}/models/nope").status_code == 404


def test_sdk_lists_models(server, tiny_server):
    assert [m.id for m in server.client().models.list().data] == [MODEL, EMBEDDING_MODEL]
    assert [m.id for m in tiny_server.client().models.list().data] == [tiny_server.model, EMBEDDING_MODEL]


def test_engine_stats(server):
    stats = httpx.get(f"{server.url}/v1/engine/stats").json()[MODEL]
    for key in ("steps", "max_batch_seqs", "kv_blocks_used", "kv_blocks_total", "num_running", "num_waiting"):
        assert isinstance(stats[key], int), key


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("EMBER_PORT", "9001")
    monkeypatch.setenv("EMBER_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("EMBER_NUM_KV_BLOCKS", "7")
    args = serve_parser().parse_args(["--max-num-seqs", "3", "--served-model-name", "x",
                                      "--num-kv-blocks", "9"])
    server, engine = config_from_args(ServerConfig, args), config_from_args(EngineConfig, args)
    assert (server.port, server.served_model_name, server.host) == (9001, "x", "127.0.0.1")
    assert (engine.max_num_seqs, engine.enable_prefix_caching, engine.num_kv_blocks) == (3, False, 9)
    assert serve_parser().parse_args([]).num_kv_blocks == 7


def test_bad_environment_value_is_a_usage_error(monkeypatch):
    import argparse

    monkeypatch.setenv("EMBER_PORT", "eighty")
    with pytest.raises(SystemExit):
        add_config_flags(argparse.ArgumentParser(), ServerConfig)


def test_serving_imports_stay_light():
    """Cold start: neither transformers nor the load generator is imported to serve."""
    code = ("import sys, ember.cli, ember.api.app, ember.serving.models; "
            "assert 'transformers' not in sys.modules and 'ember.bench' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

