"""Attention over the paged KV cache, behind one function so a fused kernel can replace it.

The cache of one layer is a flat slot array `[num_slots, num_kv_heads, head_dim]` (num_slots =
num_blocks * block_size); the runner translates block tables into slot indices once per step and
every layer reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and which cached slots each query may read.

    Decode rows (one query token each) are batched into one padded attention call; prefill chunks
    (several query tokens) run one call per sequence, since their lengths differ widely.
    """

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    # Decode group: query rows `decode_rows` of the flat batch, keys at `decode_slots` (padded).
    decode_rows: torch.Tensor | None  # [num_decode] long
    decode_slots: torch.Tensor | None  # [num_decode, max_context] long
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_context] bool, True = attend
    # Prefill chunks: (first query row, query length, cached slots of the whole context so far).
    prefills: list[tuple[int, int, torch.Tensor]]


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Store this step's K/V, then attend each query to its sequence's cached context (causally)."""
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        qd = q[meta.decode_rows].unsqueeze(2)  # [B, H, 1, D]
        kd = k_cache[meta.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
        vd = v_cache[meta.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
        out[meta.decode_rows] = od.squeeze(2)
    for start, length, slots in meta.prefills:
        context = slots.shape[0]
        qp = q[start : start + length].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kp = k_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vp = v_cache[slots].transpose(0, 1).unsqueeze(0)
        if context == length:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:  # a later chunk: query i sits at absolute position context - length + i
            rows = torch.arange(length, device=q.device).unsqueeze(1) + (context - length)
            mask = torch.arange(context, device=q.device).unsqueeze(0) <= rows
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
        out[start : start + length] = op.squeeze(0).transpose(0, 1)
    return out
