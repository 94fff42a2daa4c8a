"""A loaded chat model (LlamaModel or Gemma3Model) as an embedding encoder, as vLLM's pooling runner serves decoders:
the final hidden states (after the model's final norm) of one prefill, pooled per input by its last token (vLLM's
default for decoder embedders) or by the mean of its tokens, then L2-normalized.

The chat model's own weights and forward pass, with none of its engine's KV cache: each pass attends through a
scratch cache of one layer's size that every layer shares (a layer writes its keys and values, attends to them, and
the next layer overwrites them, so nothing is kept), freed when the pass ends. The inputs are packed end to end, not
padded: each is its own item of the attention metadata, so no input attends to another's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.models.attention import build_metadata
from ember.models.config import ModelConfig
from ember.models.gemma3 import Gemma3Model
from ember.models.llama import LlamaModel

DECODER_POOLING_MODES = ("last", "mean")
SCRATCH_BLOCK_SIZE = 16  # the scratch cache's block: attention reads a token's keys alike whatever the block size


@dataclass(frozen=True)
class DecoderPooling:
    """One vector per input from the packed hidden states; `normalize` as vLLM's embed task defaults it."""

    mode: str = "last"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in DECODER_POOLING_MODES:
            raise ValueError(f"pooling {self.mode!r} is not supported; one of {DECODER_POOLING_MODES}")

    def __call__(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden [sum(lengths), H] (inputs end to end), lengths [B] -> [B, H] in float32."""
        hidden = hidden.float()
        if self.mode == "last":
            pooled = hidden[lengths.cumsum(0) - 1]
        else:
            items = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
            pooled = hidden.new_zeros(len(lengths), hidden.shape[1]).index_add_(0, items, hidden)
            pooled = pooled / lengths[:, None].to(pooled.dtype)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


class DecoderEncoder:
    """Token ids -> pooled hidden states of a chat model; what ember.serving.embedder's EmbeddingEngine calls
    (`encode`, `config.vocab_size`, `dimensions`, `pooling.normalize`), as it calls BertEncoder."""

    def __init__(self, model: LlamaModel | Gemma3Model, max_model_len: int, pooling: str = "last") -> None:
        self.model = model  # shared with the chat engine, never copied
        self.max_model_len = max_model_len
        self.pooling = DecoderPooling(pooling)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def dimensions(self) -> int:
        return self.model.config.hidden_size

    def _scratch(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One layer's K and V cache, in the layout the model's attention path reads (ember.engine.runner's: K
        transposed within each block for the CPU kernel), handed to every layer. Zeros, as the engine's: the SDPA
        path reads whole blocks, the masked tail included."""
        cfg, model, bs = self.model.config, self.model, SCRATCH_BLOCK_SIZE
        v = torch.zeros(num_blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype, device=model.device)
        k = v.new_zeros(num_blocks, cfg.num_kv_heads, cfg.head_dim, bs) if model.fused else torch.zeros_like(v)
        return [(k, v)] * cfg.num_layers

    @torch.inference_mode()
    def encode(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), hidden] in float32 on the CPU, from one forward pass over all the inputs."""
        device, bs = self.model.device, SCRATCH_BLOCK_SIZE
        spans, first = [], 0
        for ids in inputs:  # one item per input, its prompt whole, in blocks of its own
            blocks = -(-len(ids) // bs)
            spans.append((len(ids), len(ids), torch.arange(first, first + blocks)))
            first += blocks
        meta = build_metadata(spans, bs, self.model.fused, device)
        ids = torch.tensor([t for seq in inputs for t in seq], device=device)
        hidden = self.model.forward(ids, meta.row_lengths - 1, self._scratch(first), meta)
        lengths = torch.tensor([len(seq) for seq in inputs], device=device)
        return self.pooling(hidden, lengths).cpu()
