"""Turns a scheduled batch into tensors, runs one forward pass, returns the logits to sample from."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ember.engine.scheduler import ScheduledSeq
from ember.models.attention import AttentionMetadata
from ember.models.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self._offsets = torch.arange(block_size)
        cfg, device = model.config, model.device
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.dtype, device=device),
             torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
        per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim
        return per_token * block_size * torch.tensor([], dtype=dtype).element_size()

    def _slots(self, block_table: list[int], end: int) -> torch.Tensor:
        """Cache slots of positions [0, end) of a sequence (on the CPU)."""
        blocks = torch.tensor(block_table[: -(-end // self.block_size)], dtype=torch.long)
        return (blocks.unsqueeze(1) * self.block_size + self._offsets).flatten()[:end]

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                          torch.Tensor]:
        """Input ids, positions, attention metadata and the rows whose logits are needed."""
        device = self.model.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[torch.Tensor] = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        prefills: list[tuple[int, int, torch.Tensor]] = []
        logit_rows: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            context = self._slots(seq.block_table, end)
            slot_mapping.append(context[start:])
            if item.num_new_tokens == 1:
                decode_rows.append(row)
                decode_slots.append(context)
            else:
                prefills.append((row, item.num_new_tokens, context.to(device)))
            if item.samples:
                logit_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping).to(device),
            decode_rows=None, decode_slots=None, decode_mask=None, prefills=prefills,
        )
        if decode_rows:
            width = max(len(s) for s in decode_slots)
            lengths = torch.tensor([len(s) for s in decode_slots], device=device)
            meta.decode_rows = torch.tensor(decode_rows, device=device)
            meta.decode_slots = pad_sequence(decode_slots, batch_first=True).to(device)
            meta.decode_mask = (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1))[
                :, None, None, :]
        return (torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), meta,
                torch.tensor(logit_rows, device=device, dtype=torch.long))

    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits [num sampling sequences, vocab] in float32, in batch order."""
        input_ids, positions, meta, logit_rows = self.prepare(batch)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
        return self.model.logits(hidden[logit_rows])
