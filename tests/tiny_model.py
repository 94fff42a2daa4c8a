"""A tiny random-weight Llama (via transformers) for fast engine tests, plus an engine driver."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ember.engine.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams
from ember.models.config import ModelConfig
from ember.models.loader import LoadedWeights

VOCAB = 512
EOS = 2


def make_hf_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=EOS)
    common.update(overrides)
    model_class, config_class = (Qwen2ForCausalLM, Qwen2Config) if arch == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    model = model_class(config_class(**common))
    # random init is near-uniform; sharpen it so greedy decoding is not a coin flip of ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model.eval()


def weights_of(model: torch.nn.Module) -> LoadedWeights:
    c = model.config
    rope_scaling = getattr(c, "rope_scaling", None)
    if rope_scaling and rope_scaling.get("rope_type", "default") == "default":
        rope_scaling = None
    config = ModelConfig(
        architecture=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, rope_scaling=rope_scaling,
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.model_type == "qwen2",
        bos_token_id=1, eos_token_ids=[EOS],
    )
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return LoadedWeights(config=config, tensors=tensors, path=Path("tiny"), generation_config={})


def make_engine(weights: LoadedWeights, **config) -> LLMEngine:
    config.setdefault("device", "cpu")  # the parity bounds are float32's, which "auto" is only on a CPU
    config.setdefault("num_kv_blocks", 256)
    config.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(**config), weights, [EOS])


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
            max_steps: int = 10_000) -> dict[str, list[int]]:
    """Submit everything, step until idle, return each request's generated tokens."""
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    assert not engine.has_work(), "engine did not drain"
    return out
