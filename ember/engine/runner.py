"""Turns a step's items into tensors, runs one forward pass, returns the logits to sample from."""

from __future__ import annotations

import time

import torch

from ember.engine.step import StepItem
from ember.models.attention import build_metadata
from ember.models.config import ModelConfig
from ember.models.gemma3 import Gemma3Model
from ember.models.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel | Gemma3Model, num_blocks: int, block_size: int) -> None:
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

    def copy_block(self, source: int, destination: int) -> None:
        for k, v in self.kv_caches:
            k[destination] = k[source]
            v[destination] = v[source]

    def run(self, items: list[StepItem]) -> torch.Tensor:
        """Logits [sum of the items' num_logit_rows, vocab] in float32, items in order (ember.engine.step)."""
        start = time.perf_counter()
        device, bs = self.model.device, self.block_size
        input_ids: list[int] = []
        logit_rows: list[int] = []
        spans = []
        for item in items:
            end = item.start + item.num_query_tokens
            input_ids += item.tokens
            logit_rows += range(len(input_ids) - item.num_logit_rows, len(input_ids))
            spans.append((item.num_query_tokens, end, torch.tensor(item.seq.block_table[:-(-end // bs)])))
        meta = build_metadata(spans, bs, self.cpu_attention, device)
        positions = meta.row_lengths - 1
        rows = torch.tensor(logit_rows, device=device, dtype=torch.long)
        self.last_prepare_seconds = time.perf_counter() - start
        hidden = self.model.forward(torch.tensor(input_ids, device=device), positions, self.kv_caches, meta)
        return self.model.logits(hidden[rows])
