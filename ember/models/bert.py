"""BERT encoders as sentence-transformers serves them: the Hugging Face folder's weights (config.json, safetensors),
then the modules its modules.json lists after the transformer (Pooling, optionally Normalize), so that an
embedding equals `SentenceTransformer(folder).encode(text)`.

Bidirectional attention over padded batches (a key mask, no KV cache), post-LN blocks, float32 on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ember.models.loader import _safetensors_files

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu}
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")
PAD_ID = 0  # what fills a batch's short rows: the mask hides it from attention and pooling


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    activation: str

    @classmethod
    def from_json(cls, raw: dict) -> BertConfig:
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {raw['position_embedding_type']!r} is not supported")
        if raw.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported; one of {sorted(ACTIVATIONS)}")
        return cls(raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"],
                   raw["max_position_embeddings"], float(raw.get("layer_norm_eps", 1e-12)),
                   raw.get("hidden_act", "gelu"))


@dataclass(frozen=True)
class Pooling:
    """One sentence-transformers pooling mode over the unpadded tokens, then Normalize if the folder has it."""

    mode: str
    normalize: bool

    @classmethod
    def from_folder(cls, folder: Path) -> Pooling:
        """As modules.json lists them; a folder without one gets sentence-transformers' default (mean, no
        Normalize). Modules this code cannot apply (Dense, several pooling modes) fail the load, not the answers."""
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            return cls("mean_tokens", False)
        modules = json.loads(modules_file.read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
        if unknown or kinds.count("Pooling") != 1:
            raise ValueError(f"{folder}: modules {kinds} are not supported (Transformer, one Pooling, Normalize)")
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        config = json.loads((folder / pooling_dir / "config.json").read_text())
        modes = [k.removeprefix("pooling_mode_") for k, on in config.items() if k.startswith("pooling_mode_") and on]
        if len(modes) != 1 or modes[0] not in POOLING_MODES:
            raise ValueError(f"{folder}: pooling {modes} is not supported; exactly one of {POOLING_MODES}")
        return cls(modes[0], "Normalize" in kinds)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, H], mask [B, L] (1 for tokens), lengths [B] -> [B, H]."""
        if self.mode == "cls_token":
            pooled = hidden[:, 0]
        elif self.mode == "lasttoken":
            pooled = hidden[torch.arange(len(hidden)), lengths - 1]
        elif self.mode == "max_tokens":
            pooled = hidden.masked_fill(~mask[..., None], -1e9).max(dim=1).values
        else:
            summed = (hidden * mask[..., None]).sum(dim=1)
            count = lengths[:, None].to(hidden.dtype).clamp(min=1e-9)
            pooled = summed / (count.sqrt() if self.mode == "mean_sqrt_len_tokens" else count)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


class BertEncoder:
    """Token ids -> pooled sentence embeddings; `encode` takes a batch of unpadded inputs."""

    def __init__(self, config: BertConfig, tensors: dict[str, torch.Tensor], pooling: Pooling) -> None:
        self.config, self.pooling = config, pooling
        self.act = ACTIVATIONS[config.activation]
        t = {k.removeprefix("bert."): v.float() for k, v in tensors.items()}
        self.word, self.position = t["embeddings.word_embeddings.weight"], t["embeddings.position_embeddings.weight"]
        self.token_type = t["embeddings.token_type_embeddings.weight"][0]  # one segment: type 0 everywhere
        self.embed_norm = (t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(config.num_layers):
            p = f"encoder.layer.{i}."
            attn = p + "attention.self."
            # Q, K and V as one matmul
            qkv_w = torch.cat([t[attn + n + ".weight"] for n in ("query", "key", "value")])
            qkv_b = torch.cat([t[attn + n + ".bias"] for n in ("query", "key", "value")])
            self.layers.append((qkv_w, qkv_b,
                                t[p + "attention.output.dense.weight"], t[p + "attention.output.dense.bias"],
                                t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"],
                                t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"],
                                t[p + "output.dense.weight"], t[p + "output.dense.bias"],
                                t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"]))

    @property
    def dimensions(self) -> int:
        return self.config.hidden_size

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.config.hidden_size,), weight, bias, self.config.layer_norm_eps)

    @torch.inference_mode()
    def encode(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), hidden] in one forward pass, the inputs right-padded to the longest."""
        lengths = torch.tensor([len(ids) for ids in inputs])
        width = int(lengths.max())
        ids = torch.full((len(inputs), width), PAD_ID, dtype=torch.long)
        for row, seq in enumerate(inputs):
            ids[row, :len(seq)] = torch.tensor(seq)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        hidden = self.forward(ids, mask)
        return self.pooling(hidden, mask, lengths)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, width = ids.shape
        heads, size = self.config.num_heads, self.config.hidden_size
        x = self._norm(self.word[ids] + self.position[:width] + self.token_type, *self.embed_norm)
        keys = mask[:, None, None, :]  # padding is never attended to; padded rows' own outputs go unused
        for qkv_w, qkv_b, o_w, o_b, n1_w, n1_b, i_w, i_b, d_w, d_b, n2_w, n2_b in self.layers:
            q, k, v = F.linear(x, qkv_w, qkv_b).view(batch, width, 3, heads, size // heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
            x = self._norm(F.linear(attended.transpose(1, 2).reshape(batch, width, size), o_w, o_b) + x, n1_w, n1_b)
            x = self._norm(F.linear(self.act(F.linear(x, i_w, i_b)), d_w, d_b) + x, n2_w, n2_b)
        return x


def load_bert(folder: str | Path) -> BertEncoder:
    folder = Path(folder)
    config = BertConfig.from_json(json.loads((folder / "config.json").read_text()))
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(folder):
        tensors.update(load_file(file))
    return BertEncoder(config, tensors, Pooling.from_folder(folder))
