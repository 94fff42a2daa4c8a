"""The bundled SmolLM2 GGUF: Ember's weights, logits and greedy tokens equal transformers' on the same file."""

from __future__ import annotations

import pytest
import torch

from ember.engine.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams
from ember.models.loader import default_model_path, load_model

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain gravity."}],
]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ember_model():
    weights, tokenizer = load_model(None)
    return weights, tokenizer


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding through the KV cache, EOS included (generate()'s min_new_tokens would mask it)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def test_weights_equal_transformers(hf_model, ember_model):
    weights, _ = ember_model
    ref = hf_model.state_dict()
    assert weights.config.tie_word_embeddings and "lm_head.weight" not in weights.tensors
    for name, tensor in weights.tensors.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-6, msg=name)
    assert set(ref) - set(weights.tensors) == {"lm_head.weight"}


@pytest.mark.parametrize("messages", PROMPTS)
def test_logits_and_greedy_tokens_equal_transformers(hf_model, ember_model, messages):
    weights, tokenizer = ember_model
    # float32 on the CPU, pinned: "auto" would mean bfloat16 on a CUDA machine, outside the 1e-4 bound
    engine = LLMEngine(EngineConfig(device="cpu", weights="float32", num_kv_blocks=64, max_num_batched_tokens=16),
                       weights, tokenizer.eos_token_ids)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    with torch.no_grad():
        ref_logits = hf_model(torch.tensor([prompt])).logits[0, -1]
        ref_tokens = _hf_greedy(hf_model, prompt, 64)
    # chunked prefill (16-token chunks) on purpose: the logits must not depend on it
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    logits = None
    while logits is None:
        batch = engine.scheduler.schedule()
        out = engine.runner.run(batch)
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
        if out.shape[0]:
            logits = out[0]
    scale = ref_logits.abs().max()
    assert ((logits - ref_logits).abs().max() / scale).item() < 1e-4
    engine.abort("a")
    engine.add_request("b", prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    tokens = []
    while engine.has_work():
        tokens += [t for o in engine.step() for t in o.token_ids]
    assert tokens == ref_tokens
