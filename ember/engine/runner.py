"""Turns a step's items into tensors, runs one forward pass, returns the logits to sample from."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ember.engine.step import StepItem
from ember.models.attention import build_metadata
from ember.models.config import ModelConfig
from ember.models.gemma3 import Gemma3Model
from ember.models.llama import LlamaModel


@dataclass(frozen=True)
class KVLayout:
    """Which layers share a block: one group of all layers, or (a sliding-window model, ember.engine.block_manager)
    its full-attention layers as group 0 and its window layers in groups of as many. A block holds `group_size`
    layer slots; layer i is slot `layer_slots[i]` of its group `layer_groups[i]`'s blocks."""

    group_size: int
    layer_groups: tuple[int, ...]
    layer_slots: tuple[int, ...]
    window: int | None = None

    @property
    def window_groups(self) -> int:
        return max(self.layer_groups)

    @classmethod
    def single(cls, num_layers: int) -> KVLayout:
        return cls(num_layers, (0,) * num_layers, tuple(range(num_layers)))

    @classmethod
    def grouped(cls, config: ModelConfig) -> KVLayout | None:
        """A sliding-window model's groups, or None when it has no window layers or no full ones."""
        kinds = config.layer_types or []
        full = [i for i, kind in enumerate(kinds) if kind != "sliding_attention"]
        windowed = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
        if not (full and windowed and config.sliding_window):
            return None
        size, groups, slots = len(full), [0] * len(kinds), [0] * len(kinds)
        for j, i in enumerate(full):
            slots[i] = j
        for j, i in enumerate(windowed):
            groups[i], slots[i] = 1 + j // size, j % size
        return cls(size, tuple(groups), tuple(slots), config.sliding_window)

    def bytes_per_block(self, config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        per_token = 2 * self.group_size * config.num_kv_heads * config.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: LlamaModel | Gemma3Model, num_blocks: int, block_size: int,
                 layout: KVLayout | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.last_prepare_seconds = 0.0  # of the last run(), for the engine's step phases
        cfg, device = model.config, model.device
        self.layout = layout or KVLayout.single(cfg.num_layers)
        # attention reads the cache in place with the C kernel wherever the model runs its fused C path; the
        # kernel keeps K transposed within each block (see ember.models.attention)
        self.cpu_attention = model.fused
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        k_shape = (num_blocks, cfg.num_kv_heads, cfg.head_dim, block_size) if self.cpu_attention else shape
        self._slots = [
            (torch.zeros(k_shape, dtype=model.dtype, device=device),
             torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(self.layout.group_size)
        ]
        self.kv_caches = [self._slots[s] for s in self.layout.layer_slots]  # per layer: its slot of any block

    def copy_block(self, source: int, destination: int) -> None:
        for k, v in self._slots:
            k[destination] = k[source]
            v[destination] = v[source]

    def run(self, items: list[StepItem]) -> torch.Tensor:
        """Logits [sum of the items' num_logit_rows, vocab] in float32, items in order (ember.engine.step)."""
        start = time.perf_counter()
        device, bs = self.model.device, self.block_size
        input_ids: list[int] = []
        logit_rows: list[int] = []
        spans: list[list] = [[] for _ in range(1 + self.layout.window_groups)]  # per layer group
        for item in items:
            end = item.start + item.num_query_tokens
            input_ids += item.tokens
            logit_rows += range(len(input_ids) - item.num_logit_rows, len(input_ids))
            for group, table in enumerate([item.seq.block_table, *item.seq.window_tables]):
                spans[group].append((item.num_query_tokens, end, torch.tensor(table[:-(-end // bs)])))
        metas = [build_metadata(s, bs, self.cpu_attention, device) for s in spans]
        positions = metas[0].row_lengths - 1
        meta = metas[0] if len(metas) == 1 else [metas[g] for g in self.layout.layer_groups]
        rows = torch.tensor(logit_rows, device=device, dtype=torch.long)
        self.last_prepare_seconds = time.perf_counter() - start
        hidden = self.model.forward(torch.tensor(input_ids, device=device), positions, self.kv_caches, meta)
        return self.model.logits(hidden[rows])
