"""Attention over the paged KV cache, behind one function.

The cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`. On a CPU in float32
every query row, decode or prefill, runs Ember's C kernel, which reads its sequence's blocks in place
with one arithmetic for all rows: how the scheduler chunked, batched or prefix-cached a prompt never
changes a token's attention (SDPA's causal and masked paths round differently, which flipped greedy
near-ties). The kernel keeps K transposed within each block, `[num_blocks, num_kv_heads, head_dim,
block_size]`, so a block's scores are plain vector multiply-adds across its keys. Elsewhere (CUDA,
other dtypes) items gather their blocks with `index_select` into padded SDPA calls with a causal mask
per item: one for the short queries (decodes, decodes with drafts), one for prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ember.kernels import cpu as cpu_kernels

# items with at most this many query positions (decodes, decodes with drafts) share one padded SDPA call;
# longer ones (prefill chunks) share another, so a 512-token chunk never pads every decode to 512 queries
_SHORT_QUERY = 32


@dataclass
class SdpaGroup:
    """Items attended in one padded SDPA call: query row r of item b is flat row dest[i] = b * width + r."""

    src: torch.Tensor  # [rows] the batch rows of these items' queries
    dest: torch.Tensor  # [rows] their places in the padded [items * width] queries
    width: int  # the longest query among them
    blocks: torch.Tensor  # [items, max_blocks] their block tables
    mask: torch.Tensor  # [items, 1, width, max_blocks * block_size], True = attend
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> mask, made at first use

    def window_mask(self, window: int) -> torch.Tensor:
        """The mask of a sliding-window layer: each query row also sees only the last `window` of its keys
        (made once per step, then shared by every layer with that window)."""
        if window not in self.windowed:
            keys = torch.arange(self.mask.shape[-1], device=self.mask.device)
            self.windowed[window] = self.mask & (keys >= self.mask.sum(-1, keepdim=True) - window)
        return self.windowed[window]


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and which blocks each query may read.

    Row i attends to the first row_lengths[i] slots of item row_seq[i]'s blocks (a row of seq_blocks):
    the CPU kernel's whole input, for items of any query length in one call. The SDPA path attends
    each group of items in one padded call.
    """

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot (block * block_size + offset) per new token
    seq_blocks: torch.Tensor  # [num_items, max_blocks] block tables (int64), zero padded
    row_seq: torch.Tensor  # [num_tokens] int64: the row of seq_blocks each token belongs to
    row_lengths: torch.Tensor  # [num_tokens] int64: its position + 1
    kernel: bool  # every row through the CPU kernel
    groups: list[SdpaGroup]  # the SDPA path's calls (empty with the kernel)


def build_metadata(spans: list[tuple[int, int, torch.Tensor]], block_size: int, kernel: bool,
                   device: torch.device) -> AttentionMetadata:
    """Metadata for items given as (query length, context length after this step, block table): an item's
    queries are the last `query length` positions of its context, rows in item order."""
    slots, rows_per_item, lengths = [], [], []
    for query, context, blocks in spans:
        positions = torch.arange(context - query, context)
        slots.append(blocks[positions // block_size] * block_size + positions % block_size)
        rows_per_item.append(query)
        lengths.append(positions + 1)
    seq_blocks = pad_sequence([b for _, _, b in spans], batch_first=True)
    groups = []
    if not kernel:
        first_rows = torch.tensor([0, *rows_per_item]).cumsum(0).tolist()
        for short in (True, False):
            chosen = [i for i, (query, _, _) in enumerate(spans) if (query <= _SHORT_QUERY) == short]
            if not chosen:
                continue
            width = max(spans[i][0] for i in chosen)
            src = torch.cat([torch.arange(first_rows[i], first_rows[i] + spans[i][0]) for i in chosen])
            dest = torch.cat([torch.arange(spans[i][0]) + b * width for b, i in enumerate(chosen)])
            # query r of an item with q queries and context c sits at position c - q + r and sees slots up to it
            ends = torch.tensor([spans[i][1] - spans[i][0] + 1 for i in chosen]).unsqueeze(1) + torch.arange(width)
            keys = torch.arange(seq_blocks.shape[1] * block_size)
            groups.append(SdpaGroup(src.to(device), dest.to(device), width, seq_blocks[chosen].to(device),
                                    (keys < ends.unsqueeze(-1)).unsqueeze(1).to(device)))
    return AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device), seq_blocks=seq_blocks.to(device),
        row_seq=torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(rows_per_item)).to(device),
        row_lengths=torch.cat(lengths).to(device), kernel=kernel, groups=groups)


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
    scale: float | None = None,  # default head_dim ** -0.5
    window: int | None = None,  # a sliding-window layer: each query sees only its last `window` positions
) -> torch.Tensor:
    """Attend each query to its item's cached context, causally."""
    if meta.kernel:
        return cpu_kernels.attention(q, k_cache, v_cache, meta.seq_blocks, meta.row_seq, meta.row_lengths, scale,
                                     window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    heads, dim = q.shape[1:]
    for g in meta.groups:
        items = g.blocks.shape[0]
        qp = q.new_zeros(items * g.width, heads, dim).index_copy_(0, g.dest, q.index_select(0, g.src))
        qp = qp.view(items, g.width, heads, dim).transpose(1, 2)  # [B, H, width, D]
        kp = _gather(k_cache, g.blocks).transpose(1, 2)  # [B, Hkv, L, D]
        vp = _gather(v_cache, g.blocks).transpose(1, 2)
        mask = g.mask if window is None else g.window_mask(window)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out.index_copy_(0, g.src, op.transpose(1, 2).reshape(items * g.width, heads, dim).index_select(0, g.dest))
    return out
