"""One linear layer (and embedding) over any weight format: dense tensors or GGUF blocks kept packed.

A packed weight stays exactly as the file stored it, so a token reads ~4.5 bits per weight instead of
32, and every product multiplies the blocks directly (ember/kernels: activations quantized to 8 bits
per 32 values on the fly, integer dot products). Measured on the bundled model (AMD EPYC Zen 5,
AVX-VNNI), the block kernel beats dequantizing to float32 and running torch's GEMM at every batch
size up to a 512-token prefill chunk (gate_proj: 0.03 vs 0.21 ms at 1 row, 4.3 vs 6.9 ms at 512), so
there is no float fallback for large batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.kernels import cpu


@dataclass
class PackedTensor:
    """A 2-D GGUF tensor as stored: `data` uint8 [rows, bytes per row] of `ggml_type` blocks."""

    data: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]  # (rows, values per row)

    def dequantize(self, rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return cpu.dequantize(self.ggml_type, self.data, self.shape[1], rows, out)

    @staticmethod
    def cat(parts: list[PackedTensor]) -> PackedTensor:
        """Row-wise concatenation (q/k/v, gate/up fused into one product); same type and width only."""
        first = parts[0]
        assert all(p.ggml_type == first.ggml_type and p.shape[1] == first.shape[1] for p in parts)
        return PackedTensor(torch.cat([p.data for p in parts]), first.ggml_type,
                            (sum(p.shape[0] for p in parts), first.shape[1]))


Weight = torch.Tensor | PackedTensor


class Linear:
    """y = x W^T + b; `in_features` and `out_features` as in torch."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, plus `residual` when given (which a packed layer updates in place)."""
        raise NotImplementedError


class DenseLinear(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y


class PackedLinear(Linear):
    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return cpu.qmatmul(x, self.weight.ggml_type, self.weight.data, self.in_features, self.bias, residual)


class ConcatLinear(Linear):
    """Fused projections whose parts cannot share one product (e.g. Q4_K q/k with a Q6_K v)."""

    def __init__(self, parts: list[Linear]) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if residual is None else residual + y


def make_linear(weights: list[Weight], bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype
                ) -> Linear:
    """One product over the row-wise concatenation of `weights` (each [out_i, in]) with `bias` [sum out_i].

    Packed parts stay packed (the CPU kernels); dense parts, or any part on a non-CPU device, are dense.
    """
    if bias is not None:
        bias = bias.to(device=device, dtype=dtype)
    packed = [w for w in weights if isinstance(w, PackedTensor)]
    if device.type != "cpu" or dtype != torch.float32 or len(packed) != len(weights):
        dense = [w.dequantize() if isinstance(w, PackedTensor) else w for w in weights]
        return DenseLinear(torch.cat(dense).to(device=device, dtype=dtype), bias)
    if len({(w.ggml_type, w.shape[1]) for w in packed}) == 1:
        return PackedLinear(PackedTensor.cat(packed) if len(packed) > 1 else packed[0], bias)
    parts, row = [], 0
    for w in packed:
        part_bias = None if bias is None else bias[row:row + w.shape[0]]
        parts.append(PackedLinear(w, part_bias))
        row += w.shape[0]
    return ConcatLinear(parts)


class Embedding:
    """Token embedding lookup; a packed table dequantizes only the rows looked up."""

    def __init__(self, weight: Weight, device: torch.device, dtype: torch.dtype) -> None:
        self.packed = isinstance(weight, PackedTensor) and device.type == "cpu" and dtype == torch.float32
        if self.packed:
            self.weight = weight
        else:
            dense = weight.dequantize() if isinstance(weight, PackedTensor) else weight
            self.weight = dense.to(device=device, dtype=dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return self.weight.dequantize(ids)
        return F.embedding(ids, self.weight)


def parts(lin: Linear | Embedding) -> list:
    """The products a (possibly concatenated) projection is made of."""
    return lin.parts if isinstance(lin, ConcatLinear) else [lin]


def weight_bytes(layers: list[Linear | Embedding]) -> int:
    """Bytes of weights held (a tied table counted once)."""
    seen: dict[int, int] = {}
    for layer in layers:
        for p in parts(layer):
            w = p.weight.data if isinstance(p.weight, PackedTensor) else p.weight
            seen[w.data_ptr()] = w.numel() * w.element_size()
    return sum(seen.values())
