"""Tiny Llama-family GGUF files written with gguf.GGUFWriter, with `gguf.quants` as the value oracle.

Weights start in Hugging Face layout; like llama.cpp's converter, the writer permutes the Q/K rows of
llama-architecture files, so a loader that reads them back in HF layout must undo that permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

Q = GGMLQuantizationType

# float16 scale fields (byte offsets in a block): random bytes anywhere else are valid blocks, random
# bytes there could be NaN or inf
_SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
                  Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}


@dataclass
class TinyShape:
    vocab: int = 64
    hidden: int = 256  # a multiple of 256 so every K-quant fits a row
    ffn: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute`, verbatim in effect."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid raw blocks (uint8 [rows, bytes per row]) of any block type: random bytes, finite scales."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for at in _SCALE_OFFSETS.get(qtype, ()):
        scales = rng.uniform(-0.05, 0.05, size=len(raw)).astype(np.float16)
        raw[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // block * type_size)


def encode(w: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """`w` quantized to `qtype` with gguf.quants, or random valid blocks where it cannot quantize."""
    if qtype in QUANTIZABLE:
        return quantize(w.astype(np.float32), qtype)
    return random_blocks(qtype, w.shape[0], w.shape[1], rng)


def oracle(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """What the stored bytes mean, per gguf.quants (float32, numpy shape)."""
    if data.dtype != np.uint8:
        return data.astype(np.float32).reshape(shape)
    return dequantize(data, qtype).astype(np.float32).reshape(shape)


@dataclass
class TinyGGUF:
    path: Path
    shape: TinyShape
    hf: dict[str, np.ndarray]  # the HF-layout float32 weights before quantization
    stored: dict[str, np.ndarray]  # gguf name -> oracle values of what was written (GGUF layout)


def hf_name(gguf_name: str) -> str:
    """GGUF -> HF tensor name, written out independently of the loader's own table."""
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{parts[3]}"
    return f"{top[parts[0]]}.{parts[1]}"


def write_tiny_gguf(
    path: Path,
    qtype: GGMLQuantizationType | dict[str, GGMLQuantizationType] = Q.F32,
    *,
    arch: str = "llama",
    tied: bool = False,
    shape: TinyShape | None = None,
    rope_freqs: np.ndarray | None = None,
    metadata: dict | None = None,
    seed: int = 0,
) -> TinyGGUF:
    """A tiny model: 2-D weights in `qtype` (or per-name types, defaulting to F32), norms in F32 as
    llama.cpp keeps them, Q/K rows permuted for `llama`, q/k/v biases for `qwen2`."""
    s = shape or TinyShape()
    rng = np.random.default_rng(seed)
    kv = s.kv_heads * s.head_dim

    def w(*dims: int) -> np.ndarray:
        return rng.standard_normal(dims).astype(np.float32) * 0.1

    hf: dict[str, np.ndarray] = {"token_embd.weight": w(s.vocab, s.hidden), "output_norm.weight": 1 + w(s.hidden)}
    if not tied:
        hf["output.weight"] = w(s.vocab, s.hidden)
    for i in range(s.layers):
        p = f"blk.{i}."
        hf |= {p + "attn_norm.weight": 1 + w(s.hidden), p + "attn_q.weight": w(s.hidden, s.hidden),
               p + "attn_k.weight": w(kv, s.hidden), p + "attn_v.weight": w(kv, s.hidden),
               p + "attn_output.weight": w(s.hidden, s.hidden), p + "ffn_norm.weight": 1 + w(s.hidden),
               p + "ffn_gate.weight": w(s.ffn, s.hidden), p + "ffn_up.weight": w(s.ffn, s.hidden),
               p + "ffn_down.weight": w(s.hidden, s.ffn)}
        if arch == "qwen2":
            hf |= {p + "attn_q.bias": w(s.hidden), p + "attn_k.bias": w(kv), p + "attn_v.bias": w(kv)}

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(s.layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(s.hidden)
    writer.add_feed_forward_length(s.ffn)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_token_list([f"<t{i}>" for i in range(s.vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(3)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)

    stored: dict[str, np.ndarray] = {}
    for name, value in hf.items():
        if arch == "llama" and ".attn_q." in name:
            value = converter_permute(value, s.heads)
        elif arch == "llama" and ".attn_k." in name:
            value = converter_permute(value, s.kv_heads)
        t = (qtype.get(name, Q.F32) if isinstance(qtype, dict) else qtype) if value.ndim == 2 else Q.F32
        data = encode(value, t, rng)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=t)
        else:
            writer.add_tensor(name, data)
        stored[name] = oracle(data, t, value.shape)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, s, hf, stored)
