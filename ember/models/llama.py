"""Llama-family forward pass (Llama, Mistral, Qwen2) over the paged KV cache.

No nn.Module tree: the weights come from the loader in Hugging Face layout, dense or packed GGUF
blocks, and every projection is a `Linear` over whichever it is. Fusing q/k/v and gate/up into single
products halves the number of calls per layer, which dominates small-batch decode on a CPU.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.kernels import cpu as cpu_kernels
from ember.models.attention import AttentionMetadata, paged_attention, store_kv
from ember.models.config import ModelConfig
from ember.models.linear import Embedding, Linear, PackedLinear, Weight, make_linear, parts, weight_bytes


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Linear  # [q + k + v out, hidden]
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding in Hugging Face layout; x: [tokens, heads, head_dim], cos / sin:
    [tokens, 1, head_dim / 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class LlamaModel:
    """Weights plus the forward pass; the KV cache is owned by the engine and passed in."""

    def __init__(self, config: ModelConfig, tensors: dict[str, Weight], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype

        def take(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype)

        def linear(*names: str, bias: bool = False) -> Linear:
            biases = None
            if bias and f"{names[0]}.bias" in tensors:
                biases = torch.cat([tensors[f"{n}.bias"] for n in names])
            return make_linear([tensors[f"{n}.weight"] for n in names], biases, device, dtype)

        self.embed = Embedding(tensors["model.embed_tokens.weight"], device, dtype)
        self.lm_head = linear("model.embed_tokens" if config.tie_word_embeddings else "lm_head")
        self.norm = take("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(_Layer(
                input_norm=take(f"{p}input_layernorm.weight"),
                qkv=linear(*(f"{p}self_attn.{n}_proj" for n in "qkv"), bias=True),
                o=linear(f"{p}self_attn.o_proj"),
                post_norm=take(f"{p}post_attention_layernorm.weight"),
                gate_up=linear(f"{p}mlp.gate_proj", f"{p}mlp.up_proj"),
                down=linear(f"{p}mlp.down_proj"),
            ))
        self.weight_bytes = weight_bytes([self.embed, self.lm_head] + [
            lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)])
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)
        # CPU float32: the per-layer norms, rotary embedding, cache writes, activation and attention as C
        # calls (the attention kernel holds a head of at most 512 values on its stack)
        self.fused = (device.type == "cpu" and dtype == torch.float32 and config.head_dim <= 512
                      and cpu_kernels.available())
        # and with every projection packed, a step runs all layers in one C call
        self.one_call = self.fused and all(
            isinstance(lin, PackedLinear) for layer in self.layers for lin in (*parts(layer.qkv), layer.o,
                                                                               layer.gate_up, layer.down))
        self._step_model: tuple[list, cpu_kernels.QModel, object] | None = None

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return cpu_kernels.rms_norm(x, weight, self.config.rms_norm_eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _rope_store(self, qkv: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
        """Rotary embedding of q and k, k and v written to the cache; returns q [tokens, heads, head_dim]."""
        cfg, n = self.config, qkv.shape[0]
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if self.fused:
            cpu_kernels.rope_store(qkv, positions, self.cos, self.sin, cfg.num_heads, cfg.num_kv_heads,
                                   meta.slot_mapping, k_cache, v_cache)
            return qkv[:, :q_size].view(n, cfg.num_heads, cfg.head_dim)
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        q = apply_rope(qkv[:, :q_size].view(n, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(qkv[:, q_size:q_size + kv_size].view(n, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        store_kv(k, qkv[:, q_size + kv_size:].view(n, cfg.num_kv_heads, cfg.head_dim), k_cache, v_cache, meta)
        return q

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return cpu_kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _describe(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> cpu_kernels.QModel:
        """The C description of this model over these caches, kept for the last cache list (the engine's, step
        after step). Returned from a local, never re-read from self: another thread (a decoder embedding pass,
        ember.models.decoder_encoder) may describe its own caches meanwhile. It holds its layer array itself."""
        step = self._step_model
        if step is None or step[0] is not kv_caches:
            cfg = self.config

            def q(lin: Linear) -> cpu_kernels.QWeight:
                return cpu_kernels.qweight(lin.weight.ggml_type, lin.weight.data, lin.in_features, lin.bias)

            def qkv(lin: Linear) -> tuple[int, ctypes.Array]:
                products = parts(lin)
                return len(products), (cpu_kernels.QWeight * 3)(*[q(p) for p in products])

            layers = (cpu_kernels.QLayer * cfg.num_layers)(*[
                cpu_kernels.QLayer(layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), *qkv(layer.qkv),
                                   q(layer.o), q(layer.gate_up), q(layer.down), k.data_ptr(), v.data_ptr())
                for layer, (k, v) in zip(self.layers, kv_caches, strict=True)])
            model = cpu_kernels.QModel(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                       cfg.intermediate_size, kv_caches[0][1].shape[1], cfg.rms_norm_eps,
                                       self.cos.data_ptr(), self.sin.data_ptr(), layers)
            step = self._step_model = (kv_caches, model, layers)
        return step[1]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor,
                torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token."""
        n, q_size = input_ids.shape[0], self.config.num_heads * self.config.head_dim
        h = self.embed(input_ids)
        if self.one_call and meta.kernel:
            cpu_kernels.forward_layers(self._describe(kv_caches), h, positions, meta.slot_mapping, meta.seq_blocks,
                                       meta.row_seq, meta.row_lengths)
            return self._rms_norm(h, self.norm)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            q = self._rope_store(layer.qkv(self._rms_norm(h, layer.input_norm)), positions, k_cache, v_cache, meta)
            h = layer.o(paged_attention(q, k_cache, v_cache, meta).reshape(n, q_size), residual=h)
            h = layer.down(self._act(layer.gate_up(self._rms_norm(h, layer.post_norm))), residual=h)
        return self._rms_norm(h, self.norm)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
