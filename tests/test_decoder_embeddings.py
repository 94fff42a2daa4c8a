"""Chat models as embedders (ember.models.decoder_encoder behind ember.serving.embedder's engine): last-token and mean
pooled final hidden states equal transformers' on the same weights (Llama, Qwen2, Gemma 3 with its sliding window,
through the CPU attention kernel and the SDPA path CUDA takes), a batch of inputs equals each input alone, the packed
one-call C path agrees, concurrent requests share a forward pass, and the chat engine's KV cache is never touched,
even while it generates in another thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from ember.engine.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.models.config import ModelConfig
from ember.models.decoder_encoder import DecoderEncoder
from ember.models.gemma3 import Gemma3Model
from ember.models.llama import LlamaModel
from ember.models.loader import LoadedWeights, default_model_path, load_model
from ember.models.tokenizer import Tokenizer
from ember.serving.embedder import decoder_embedding_model
from ember.serving.errors import RequestError
from tests.helpers_gguf import Q, write_tiny_gguf
from tests.tiny_model import EOS, greedy, make_engine, make_hf_model, run_all, weights_of

CPU = torch.device("cpu")
# lengths 1 to 70: within one scratch block, across several, past Gemma's 8-token test window
LENGTHS = [5, 1, 17, 70, 16, 33, 2]


def _inputs(vocab: int, lengths: list[int] = LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _gemma3_hf(seed: int = 0) -> Gemma3ForCausalLM:
    """A tiny random Gemma 3: five sliding layers of window 8 then a full one, norms away from their zero init."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              max_position_embeddings=1024, query_pre_attn_scalar=16, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model.eval()


def _gemma3_weights(model: Gemma3ForCausalLM) -> LoadedWeights:
    c = model.config
    config = ModelConfig(
        architecture="gemma3", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_parameters["full_attention"]["rope_theta"], rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=True, layer_types=list(c.layer_types), sliding_window=c.sliding_window,
        rope_local_theta=c.rope_parameters["sliding_attention"]["rope_theta"],
        query_pre_attn_scalar=c.query_pre_attn_scalar, final_logit_softcapping=c.final_logit_softcapping,
        bos_token_id=2, eos_token_ids=[1])
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return LoadedWeights(config=config, tensors=tensors, path=Path("tiny-gemma3"), generation_config={})


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def pair(request) -> tuple[torch.nn.Module, LoadedWeights]:
    """A transformers model and the same weights as Ember loads them."""
    if request.param == "gemma3":
        hf = _gemma3_hf()
        return hf, _gemma3_weights(hf)
    hf = make_hf_model(request.param)
    return hf, weights_of(hf)


def _model(weights: LoadedWeights, kernel: bool) -> LlamaModel | Gemma3Model:
    """Ember's model on the CPU in float32; kernel=False takes the SDPA attention path (as on CUDA)."""
    model_class = Gemma3Model if weights.config.architecture == "gemma3" else LlamaModel
    model = model_class(weights.config, weights.tensors, CPU, torch.float32)
    assert model.fused  # the C kernels are built here
    model.fused = kernel
    return model


def _reference(hf: torch.nn.Module, inputs: list[list[int]], pooling: str) -> torch.Tensor:
    """transformers' last hidden state (after the final norm), one input at a time (no padding), pooled."""
    rows = []
    with torch.no_grad():
        for ids in inputs:
            hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            rows.append(hidden[-1] if pooling == "last" else hidden.mean(0))
    return F.normalize(torch.stack(rows), dim=1)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "sdpa"])
def test_pooled_hidden_states_equal_transformers(pair, pooling, kernel):
    hf, weights = pair
    encoder = DecoderEncoder(_model(weights, kernel), 1024, pooling)
    inputs = _inputs(weights.config.vocab_size)
    vectors = encoder.encode(inputs)  # the whole batch in one forward pass
    reference = _reference(hf, inputs, pooling)
    assert vectors.shape == (len(inputs), weights.config.hidden_size) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(inputs)), atol=1e-5)
    cosines = F.cosine_similarity(vectors, reference, dim=1)
    assert cosines.min() >= 0.99999, cosines.tolist()
    # the pooling matters: last-token and mean vectors of an input longer than one token differ
    other = DecoderEncoder(encoder.model, 1024, "mean" if pooling == "last" else "last").encode(inputs)
    assert F.cosine_similarity(vectors[0], other[0], dim=0) < 0.999


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "sdpa"])
def test_batch_equals_one_at_a_time(pair, kernel):
    _, weights = pair
    encoder = DecoderEncoder(_model(weights, kernel), 1024, "mean")
    inputs = _inputs(weights.config.vocab_size, seed=1)
    together = encoder.encode(inputs)
    alone = torch.cat([encoder.encode([ids]) for ids in inputs])
    assert torch.allclose(together, alone, atol=1e-6), (together - alone).abs().max()
    # and in another order, with a duplicate: rows never see each other
    order = [3, 0, 6, 3, 1]
    assert torch.allclose(encoder.encode([inputs[i] for i in order]), together[order], atol=1e-6)


def test_chat_engine_kv_cache_untouched():
    """An embedding pass between the steps of a running chat request: the engine's blocks and cache stay as they
    were, and the request's tokens equal an uninterrupted run's."""
    hf = make_hf_model()
    prompt = _inputs(512, [20])[0]
    expected = run_all(make_engine(weights_of(hf)), {"a": (prompt, greedy(24))})["a"]

    engine = make_engine(weights_of(hf))
    encoder = DecoderEncoder(engine.model, engine.max_model_len)
    assert encoder.model is engine.runner.model  # the chat model itself, weights shared
    engine.add_request("a", prompt, greedy(24))
    tokens = [t for _ in range(3) for out in engine.step() for t in out.token_ids]
    free = engine.block_manager.num_free_blocks
    cache = [(k.clone(), v.clone()) for k, v in engine.runner.kv_caches]
    vectors = encoder.encode(_inputs(512))
    assert engine.block_manager.num_free_blocks == free
    assert all(torch.equal(k, k0) and torch.equal(v, v0)
               for (k, v), (k0, v0) in zip(engine.runner.kv_caches, cache, strict=True))
    while engine.has_work():
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == expected
    assert torch.equal(encoder.encode(_inputs(512)), vectors)


@pytest.fixture(scope="module")
def packed_engine(tmp_path_factory) -> LLMEngine:
    """A tiny Q8_0 GGUF with its weights packed: the chat engine's forward pass is the one-call C path."""
    tiny = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", Q.Q8_0)
    loaded, _ = load_model(tiny.path, torch.float32, packed=True)
    engine = LLMEngine(EngineConfig(weights="quantized", num_kv_blocks=64, block_size=4), loaded, [EOS])
    assert engine.model.one_call and engine.runner.cpu_attention
    return engine


def test_packed_one_call_path(packed_engine):
    """Batch invariant, and as the per-operation path computes it (same kernels, same rounding)."""
    model = packed_engine.model
    encoder = DecoderEncoder(model, packed_engine.max_model_len)
    inputs = _inputs(model.config.vocab_size, seed=2)
    together = encoder.encode(inputs)
    assert torch.allclose(together, torch.cat([encoder.encode([ids]) for ids in inputs]), atol=1e-6)
    model.one_call = False
    try:
        per_operation = encoder.encode(inputs)
    finally:
        model.one_call = True
    assert torch.allclose(together, per_operation, atol=1e-5)


def test_embedding_beside_a_generating_engine_thread(packed_engine):
    """The chat engine steps in its own thread while passes of embeddings run in this one, on the same model (the
    C description of each thread's caches stays its own): both give what they give alone."""
    engine, inputs = packed_engine, _inputs(64, seed=3)
    requests = {f"r{i}": (_inputs(64, [7 + i], seed=10 + i)[0], greedy(40)) for i in range(4)}
    alone_tokens = run_all(engine, requests)
    encoder = DecoderEncoder(engine.model, engine.max_model_len)
    alone_vectors = encoder.encode(inputs)
    free = engine.block_manager.num_free_blocks

    result: dict[str, list[int]] = {}
    thread = threading.Thread(target=lambda: result.update(run_all(engine, {f"b{k}": v for k, v in requests.items()})))
    thread.start()
    passes = 0
    while thread.is_alive() or passes < 5:
        assert torch.allclose(encoder.encode(inputs), alone_vectors, atol=1e-6)
        passes += 1
    thread.join()
    assert {k.removeprefix("b"): v for k, v in result.items()} == alone_tokens
    assert engine.block_manager.num_free_blocks == free


def test_engine_shares_passes_across_requests():
    """Three requests of several inputs, waiting together, go through one forward pass; each gets its own vectors,
    as the encoder gives them."""
    hf = make_hf_model()
    engine = make_engine(weights_of(hf))
    tokenizer = Tokenizer.load(default_model_path())
    embedder = decoder_embedding_model("tiny", engine.model, tokenizer, engine.max_model_len)
    assert embedder.dimensions == 64 and embedder.normalizes and embedder.max_model_len == engine.max_model_len
    assert embedder.engine.encoder.model is engine.model
    requests = [_inputs(512, [3, 40], seed=4), _inputs(512, [9], seed=5), _inputs(512, [1, 12, 25], seed=6)]

    async def main() -> list[list[np.ndarray]]:
        tasks = [asyncio.create_task(embedder.engine.embed(inputs)) for inputs in requests]
        await asyncio.sleep(0)  # every input waiting before the loop wakes
        embedder.engine.start()
        try:
            return await asyncio.gather(*tasks)
        finally:
            embedder.engine.shutdown()

    results = asyncio.run(main())
    counters = embedder.engine.counters
    assert (counters["requests"], counters["inputs"], counters["steps"]) == (3, 6, 1)
    for inputs, vectors in zip(requests, results, strict=True):
        expected = embedder.engine.encoder.encode(inputs).numpy()
        assert np.allclose(np.stack(vectors), expected, atol=1e-6)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_tokenize_as_completions_and_check():
    """Plain text, no chat template; BOS where the tokenizer adds one to a completion's prompt."""
    smol = Tokenizer.load(default_model_path())
    with_bos = Tokenizer(smol.backend, bos_token_id=1, eos_token_ids=[2], chat_templates=None, add_bos=True)
    model = _model(weights_of(make_hf_model()), True)
    texts = ["Hello there, embeddings.", "<|im_start|>user", " "]
    for tokenizer in (smol, with_bos):
        embedder = decoder_embedding_model("tiny", model, tokenizer, 64)
        ids = asyncio.run(embedder.tokenize(texts))
        assert ids == [tokenizer.encode(text) for text in texts]
    assert ids[0][0] == 1 and ids[0][1:] == smol.encode(texts[0])
    assert ids[1] == [1, smol.token_to_id("<|im_start|>"), *smol.encode("user")]

    embedder.check([[1] * 64, [511]])
    with pytest.raises(RequestError, match="at most 64") as too_long:
        embedder.check([[1], [1] * 65])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="vocabulary has 512"):
        embedder.check([[512]])
    with pytest.raises(RequestError, match="no tokens"):
        embedder.check([[]])


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling 'cls'"):
        DecoderEncoder(_model(weights_of(make_hf_model()), True), 64, "cls")
