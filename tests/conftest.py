"""Session-scoped servers for the API tests: each configuration loads the model once."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from ember.models.loader import default_model_path
from ember.models.tokenizer import Tokenizer
from tests.server import TINY_BLOCK_SIZE, TINY_GENERATION_CONFIG, TINY_KV_BLOCKS, TINY_MODEL, Server, launch


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    """The bundled model with default settings."""
    with launch(log=tmp_path_factory.mktemp("ember") / "serve.log") as s:
        yield s


@pytest.fixture(scope="session")
def float32_server(tmp_path_factory) -> Iterator[Server]:
    """The bundled model dequantized to float32 (`--weights float32`), for exact parity with transformers;
    the packed default's own error is bounded in test_quantized_model.py."""
    with launch("--weights", "float32", log=tmp_path_factory.mktemp("ember-f32") / "serve.log") as s:
        yield s


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory) -> Iterator[Server]:
    """A 12-block KV cache (forces preemption; 192-token context), its own served name, sampling
    defaults from --generation-config, and one setting from an EMBER_* variable instead of a flag."""
    folder = tmp_path_factory.mktemp("ember-tiny")
    config = folder / "generation_config.json"
    config.write_text(json.dumps(TINY_GENERATION_CONFIG))
    args = ("--block-size", str(TINY_BLOCK_SIZE), "--served-model-name", TINY_MODEL,
            "--generation-config", str(config))
    with launch(*args, model=TINY_MODEL, env={"EMBER_NUM_KV_BLOCKS": str(TINY_KV_BLOCKS)},
                log=folder / "serve.log") as s:
        yield s


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The bundled model's tokenizer, to build prompts and read answers as the server does."""
    return Tokenizer.load(default_model_path())
