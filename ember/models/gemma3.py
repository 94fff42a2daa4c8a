"""Gemma 3 forward pass over the paged KV cache.

Where Gemma 3 differs from Llama (ember/models/llama.py), as transformers' Gemma3ForCausalLM computes it:
embeddings scaled by sqrt(hidden); RMSNorm weights applied as 1 + w; four norms a layer, two of them on the
attention's and the MLP's outputs before they join the residual; q and k RMS-normed per head before the
rotary embedding; five layers in six attend to a sliding window of recent positions with their own rope
base, the sixth to the whole context with the global base (and rope scaling); scores scaled by
query_pre_attn_scalar ** -0.5; a GeGLU MLP (tanh-approximated GELU); final logits optionally tanh-capped.

The projections are the same `Linear`s (GGUF blocks kept packed on the CPU), and the norms, rotary embedding,
cache writes and attention run on the same C kernels: a norm with weight 1 + w is a plain RMSNorm, so the 1
is added once at load. Llama's one-call C forward pass has Llama's layer shape and is not used; GeGLU is torch's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.kernels import cpu as cpu_kernels
from ember.models.attention import AttentionMetadata, paged_attention, store_kv
from ember.models.config import ModelConfig
from ember.models.linear import Embedding, Linear, Weight, make_linear, weight_bytes
from ember.models.llama import apply_rope, rope_inv_freq


@dataclass
class _Layer:
    input_norm: torch.Tensor  # every norm weight here is 1 + w, in float32
    qkv: Linear  # [q + k + v out, hidden]
    q_norm: torch.Tensor  # [head_dim], per head
    k_norm: torch.Tensor
    o: Linear
    post_attention_norm: torch.Tensor
    pre_feedforward_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear
    post_feedforward_norm: torch.Tensor
    window: int | None  # a sliding-window layer's window; None: the whole context
    cos: torch.Tensor  # the rotary tables of the layer's kind, [positions, head_dim / 2]
    sin: torch.Tensor


class Gemma3Model:
    """Weights plus the forward pass; the KV cache is owned by the engine and passed in (as for LlamaModel)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, Weight], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype

        def norm(name: str) -> torch.Tensor:
            return (1 + tensors[f"{name}.weight"].float()).to(device)

        def linear(*names: str) -> Linear:
            return make_linear([tensors[f"{n}.weight"] for n in names], None, device, dtype)

        def rope_tables(theta: float, scaling: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
            inv_freq = rope_inv_freq(dataclasses.replace(config, rope_theta=theta, rope_scaling=scaling))
            freqs = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq)
            return freqs.cos().to(device), freqs.sin().to(device)

        self.embed = Embedding(tensors["model.embed_tokens.weight"], device, dtype)
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=device)  # in dtype, as HF
        self.lm_head = linear("model.embed_tokens" if config.tie_word_embeddings else "lm_head")
        self.norm = norm("model.norm")
        tables = {"sliding_attention": rope_tables(config.rope_local_theta, None),
                  "full_attention": rope_tables(config.rope_theta, config.rope_scaling)}
        self.layers: list[_Layer] = []
        for i, kind in enumerate(config.layer_types):
            p = f"model.layers.{i}."
            self.layers.append(_Layer(
                input_norm=norm(f"{p}input_layernorm"),
                qkv=linear(*(f"{p}self_attn.{n}_proj" for n in "qkv")),
                q_norm=norm(f"{p}self_attn.q_norm"),
                k_norm=norm(f"{p}self_attn.k_norm"),
                o=linear(f"{p}self_attn.o_proj"),
                post_attention_norm=norm(f"{p}post_attention_layernorm"),
                pre_feedforward_norm=norm(f"{p}pre_feedforward_layernorm"),
                gate_up=linear(f"{p}mlp.gate_proj", f"{p}mlp.up_proj"),
                down=linear(f"{p}mlp.down_proj"),
                post_feedforward_norm=norm(f"{p}post_feedforward_layernorm"),
                window=config.sliding_window if kind == "sliding_attention" else None,
                cos=tables[kind][0],
                sin=tables[kind][1],
            ))
        self.weight_bytes = weight_bytes([self.embed, self.lm_head] + [
            lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)])
        self.scale = config.query_pre_attn_scalar ** -0.5
        # CPU float32: norms, rotary embedding, cache writes and attention as C calls (a head of at most 512 values)
        self.fused = (device.type == "cpu" and dtype == torch.float32 and config.head_dim <= 512
                      and cpu_kernels.available())

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Gemma's RMSNorm with `weight` = 1 + w: normalized and weighted in float32, then back to x's dtype."""
        if self.fused:
            return cpu_kernels.rms_norm(x, weight, self.config.rms_norm_eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps) * weight).to(x.dtype)

    def _attention(self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Self-attention of the normed input x [tokens, hidden], this step's k and v written to the cache;
        returns [tokens, heads * head_dim]."""
        cfg, n, d = self.config, x.shape[0], self.config.head_dim
        q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        qkv = layer.qkv(x)
        q = self._rms_norm(qkv[:, :q_size].reshape(-1, d), layer.q_norm).view(n, cfg.num_heads, d)
        k = self._rms_norm(qkv[:, q_size:q_size + kv_size].reshape(-1, d), layer.k_norm).view(n, cfg.num_kv_heads, d)
        if self.fused:  # the normed q and k back in place, where the C call rotates them and stores k and v
            qkv[:, :q_size], qkv[:, q_size:q_size + kv_size] = q.view(n, q_size), k.view(n, kv_size)
            cpu_kernels.rope_store(qkv, positions, layer.cos, layer.sin, cfg.num_heads, cfg.num_kv_heads,
                                   meta.slot_mapping, k_cache, v_cache)
            q = qkv[:, :q_size].view(n, cfg.num_heads, d)
        else:
            cos = layer.cos.index_select(0, positions).unsqueeze(1)
            sin = layer.sin.index_select(0, positions).unsqueeze(1)
            q = apply_rope(q, cos, sin)
            store_kv(apply_rope(k, cos, sin), qkv[:, q_size + kv_size:].view(n, cfg.num_kv_heads, d), k_cache, v_cache,
                     meta)
        return paged_attention(q, k_cache, v_cache, meta, self.scale, layer.window).reshape(n, q_size)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor,
                torch.Tensor]], meta: AttentionMetadata | list[AttentionMetadata]) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token. `meta`: one for every layer, or one per
        layer (its group's blocks, when window layers keep blocks of their own: ember.engine.block_manager)."""
        h = self.embed(input_ids) * self.embed_scale
        metas = meta if isinstance(meta, list) else [meta] * len(self.layers)
        for layer, (k_cache, v_cache), layer_meta in zip(self.layers, kv_caches, metas, strict=True):
            attention = self._attention(layer, self._rms_norm(h, layer.input_norm), positions, k_cache, v_cache,
                                        layer_meta)
            h = h + self._rms_norm(layer.o(attention), layer.post_attention_norm)
            gate, up = layer.gate_up(self._rms_norm(h, layer.pre_feedforward_norm)).chunk(2, dim=-1)
            h = h + self._rms_norm(layer.down(F.gelu(gate, approximate="tanh") * up), layer.post_feedforward_norm)
        return self._rms_norm(h, self.norm)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
