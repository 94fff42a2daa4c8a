"""The architecture hyper-parameters every loader produces and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Llama-family (and Gemma 3) shape, read from GGUF metadata or a Hugging Face config.json."""

    architecture: str  # "llama", "mistral", "qwen2" or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: dict | None = None  # HF-style dict, e.g. {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Gemma 3 (None elsewhere): which layers attend to a sliding window ("sliding_attention") and which to the
    # whole context ("full_attention"), the window, the sliding layers' rope base (rope_theta and rope_scaling
    # are the full layers'), the attention scale's base (scores * query_pre_attn_scalar ** -0.5) and the
    # tanh cap on the final logits
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
