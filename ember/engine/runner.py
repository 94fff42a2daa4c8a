"""Turns a scheduled batch into tensors, runs one forward pass, returns the logits to sample from."""

from __future__ import annotations

import time

import torch
from torch.nn.utils.rnn import pad_sequence

from ember.engine.scheduler import ScheduledSeq
from ember.models.attention import AttentionMetadata
from ember.models.config import ModelConfig
from ember.models.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.last_prepare_seconds = 0.0  # of the last run(), for the engine's step phases
        cfg, device = model.config, model.device
        # attention reads the cache in place with the C kernel wherever the model runs its fused C path; the
        # kernel keeps K transposed within each block (see ember.models.attention)
        self.cpu_attention = model.fused
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        k_shape = (num_blocks, cfg.num_kv_heads, cfg.head_dim, block_size) if self.cpu_attention else shape
        self.kv_caches = [
            (torch.zeros(k_shape, dtype=model.dtype, device=device),
             torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                          torch.Tensor]:
        """Input ids, positions, attention metadata and the rows whose logits are needed.

        The scheduler puts single-token items first, so decode rows are the batch's leading rows.
        """
        device, bs = self.model.device, self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        seq_blocks: list[torch.Tensor] = []
        rows_per_seq: list[int] = []
        prefills: list[tuple[int, int, int, torch.Tensor]] = []
        logit_rows: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            blocks = torch.tensor(seq.block_table[:-(-end // bs)], dtype=torch.long)
            offsets = torch.arange(start, end)
            slots.append(blocks[offsets // bs] * bs + offsets % bs)
            seq_blocks.append(blocks)
            rows_per_seq.append(item.num_new_tokens)
            if item.num_new_tokens > 1 and not self.cpu_attention:
                prefills.append((len(input_ids), item.num_new_tokens, end, blocks.to(device)))
            else:
                assert not prefills, "decodes must precede prefill chunks in a scheduled batch"
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            logit_rows.extend(range(len(input_ids) - item.num_logit_rows, len(input_ids)))
        position_t = torch.tensor(positions, device=device)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(device),
            seq_blocks=pad_sequence(seq_blocks, batch_first=True).to(device),
            row_seq=torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(rows_per_seq)).to(device),
            row_lengths=position_t + 1,
            num_decodes=len(batch) - len(prefills),
            prefills=prefills,
            kernel=self.cpu_attention,
        )
        if meta.num_decodes and not self.cpu_attention:
            width = meta.seq_blocks.shape[1] * bs
            lengths = meta.row_lengths[:meta.num_decodes]
            meta.decode_mask = (torch.arange(width, device=device) < lengths.unsqueeze(1))[:, None, None, :]
        return (torch.tensor(input_ids, device=device), position_t, meta,
                torch.tensor(logit_rows, device=device, dtype=torch.long))

    def copy_block(self, source: int, destination: int) -> None:
        for k, v in self.kv_caches:
            k[destination] = k[source]
            v[destination] = v[source]

    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits [sum of the items' num_logit_rows, vocab] in float32, in batch order."""
        start = time.perf_counter()
        input_ids, positions, meta, logit_rows = self.prepare(batch)
        self.last_prepare_seconds = time.perf_counter() - start
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
        return self.model.logits(hidden[logit_rows])
