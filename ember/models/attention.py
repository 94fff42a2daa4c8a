"""Attention over the paged KV cache, behind one function.

The cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`. On a CPU in float32
every query row, decode or prefill, runs Ember's C kernel, which reads its sequence's blocks in place
with one arithmetic for all rows: how the scheduler chunked, batched or prefix-cached a prompt never
changes a token's attention (SDPA's causal and masked paths round differently, which flipped greedy
near-ties). The kernel keeps K transposed within each block, `[num_blocks, num_kv_heads, head_dim,
block_size]`, so a block's scores are plain vector multiply-adds across its keys. Elsewhere (CUDA,
other dtypes) decodes gather whole blocks with `index_select` into one padded SDPA call and prefill
chunks gather their context for SDPA's flash kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.kernels import cpu as cpu_kernels


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and which blocks each query may read.

    Row i attends to the first row_lengths[i] slots of sequence row_seq[i]'s blocks (a row of
    seq_blocks): the CPU kernel's whole input. For the SDPA path, the first `num_decodes` rows are
    single-token decodes of sequences 0..num_decodes-1, and the prefill chunks after them run one
    call per sequence.
    """

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot (block * block_size + offset) per new token
    seq_blocks: torch.Tensor  # [num_seqs, max_blocks] block tables (int64), zero padded
    row_seq: torch.Tensor  # [num_tokens] int64: the row of seq_blocks each token belongs to
    row_lengths: torch.Tensor  # [num_tokens] int64: its position + 1
    num_decodes: int
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (first row, query length, context length, blocks)
    kernel: bool  # every row through the CPU kernel
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks * block_size], True = attend


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[*blocks.shape[:-1], num_blocks * block_size, kv_heads, head_dim] for a (batch of) block table(s)."""
    out = cache.index_select(0, blocks.flatten())
    return out.view(*blocks.shape[:-1], blocks.shape[-1] * cache.shape[1], *cache.shape[2:])


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """This step's keys and values ([num_tokens, num_kv_heads, head_dim]) into their cache slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, meta.slot_mapping, v)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K/V stored
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Attend each query to its sequence's cached context (causally)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d = meta.num_decodes
    if meta.kernel:
        return cpu_kernels.attention(q, k_cache, v_cache, meta.seq_blocks, meta.row_seq, meta.row_lengths)
    if d:
        kd = _gather(k_cache, meta.seq_blocks[:d]).transpose(1, 2)  # [B, Hkv, L, D]
        vd = _gather(v_cache, meta.seq_blocks[:d]).transpose(1, 2)
        od = F.scaled_dot_product_attention(q[:d].unsqueeze(2), kd, vd, attn_mask=meta.decode_mask,
                                            enable_gqa=True)
        out[:d] = od.squeeze(2)
    for start, length, context, blocks in meta.prefills:
        qp = q[start:start + length].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        kp = _gather(k_cache, blocks)[:context].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vp = _gather(v_cache, blocks)[:context].transpose(0, 1).unsqueeze(0)
        if context == length:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:  # a later chunk: query i sits at absolute position context - length + i
            rows = torch.arange(length, device=q.device).unsqueeze(1) + (context - length)
            mask = torch.arange(context, device=q.device).unsqueeze(0) <= rows
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
        out[start:start + length] = op.squeeze(0).transpose(0, 1)
    return out
