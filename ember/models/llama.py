"""Llama-family forward pass (Llama, Mistral, Qwen2) over the paged KV cache.

Plain tensors and `F.linear`, no nn.Module tree: the weights come from the loader already in
Hugging Face layout, and fusing q/k/v and gate/up into single matmuls halves the number of kernel
launches per layer, which dominates small-batch decode on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.models.attention import AttentionMetadata, paged_attention
from ember.models.config import ModelConfig


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + k + v out, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3's long-context rescaling when the config asks."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class LlamaModel:
    """Weights plus the forward pass; the KV cache is owned by the engine and passed in."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype

        def take(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype)

        self.embed = take("model.embed_tokens.weight")
        self.lm_head = self.embed if config.tie_word_embeddings else take("lm_head.weight")
        self.norm = take("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            qkv_bias = None
            if f"{p}self_attn.q_proj.bias" in tensors:
                qkv_bias = torch.cat([take(f"{p}self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(_Layer(
                input_norm=take(f"{p}input_layernorm.weight"),
                qkv=torch.cat([take(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]),
                qkv_bias=qkv_bias,
                o=take(f"{p}self_attn.o_proj.weight"),
                post_norm=take(f"{p}post_attention_layernorm.weight"),
                gate_up=torch.cat([take(f"{p}mlp.gate_proj.weight"), take(f"{p}mlp.up_proj.weight")]),
                down=take(f"{p}mlp.down_proj.weight"),
            ))
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half rotary embedding in Hugging Face layout; x: [tokens, heads, head_dim]."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor,
                torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token."""
        cfg = self.config
        n = input_ids.shape[0]
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        h = F.embedding(input_ids, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = self._rms_norm(h, layer.input_norm)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q = self._rope(qkv[:, :q_size].view(n, cfg.num_heads, cfg.head_dim), cos, sin)
            k = self._rope(qkv[:, q_size:q_size + kv_size].view(n, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = qkv[:, q_size + kv_size:].view(n, cfg.num_kv_heads, cfg.head_dim)
            attn = paged_attention(q, k, v, k_cache, v_cache, meta)
            h = h + F.linear(attn.reshape(n, q_size), layer.o)
            x = self._rms_norm(h, layer.post_norm)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.down)
        return self._rms_norm(h, self.norm)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
