"""The C kernels against gguf.quants: every packed type, odd shapes, every ISA path and thread count.

Two references per product: the exact one (activations quantized to 8 bits per 32-block the way the
kernel does, weights dequantized by gguf.quants, summed in float64), which the kernel must match to
float32 rounding, and the float one (unquantized activations), which it must match within the bound
that 8-bit activation rounding implies: |error| <= sum over blocks of (amax / 254) * sum |w|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ember.kernels import cpu
from tests.helpers_gguf import random_blocks

Q = GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ISAS = [name for name in cpu.ISA_LEVELS if cpu.select_isa(name) == name]
cpu.select_isa("avx512-amx")


@pytest.fixture(params=ISAS)
def isa(request):
    yield cpu.select_isa(request.param)
    cpu.select_isa("avx512-amx")


def quantize_q8(x: np.ndarray) -> np.ndarray:
    """The kernel's activation rounding: per 32 values, d = amax / 127, q = round-half-even(x / d)."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    return (np.round(blocks * inv) * d).reshape(x.shape).astype(np.float64)


def case(qtype, n, k, m, seed=0):
    rng = np.random.default_rng(seed)
    raw = random_blocks(qtype, n, k, rng)
    w = gguf_dequantize(raw, qtype).astype(np.float64).reshape(n, k)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 3, size=(m, 1)).astype(np.float32)
    return raw, w, x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 256, 1), (7, 512, 3), (130, 768, 5), (33, 256, 17)],
                         ids=lambda s: "x".join(map(str, s)))
def test_qmatmul_matches_gguf(isa, qtype, shape):
    n, k, m = shape
    raw, w, x = case(qtype, n, k, m, seed=n * k + m)
    bias = torch.randn(n)
    y = cpu.qmatmul(torch.from_numpy(x), int(qtype), torch.from_numpy(raw), k, bias).double().numpy()
    exact = quantize_q8(x) @ w.T + bias.double().numpy()
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T + 1e-3
    assert np.abs(y - exact).max(initial=0) <= (2e-6 * scale).max(), (isa, qtype.name)
    # the float reference within the 8-bit activation rounding bound
    amax = np.abs(x.reshape(m, -1, 32)).max(-1)  # [m, blocks]
    wsum = np.abs(w.reshape(n, -1, 32)).sum(-1)  # [n, blocks]
    bound = (amax / 254) @ wsum.T + 2e-6 * scale
    assert np.all(np.abs(y - (x.astype(np.float64) @ w.T + bias.double().numpy())) <= bound)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_thread_counts_agree(threads):
    raw, _, x = case(Q.Q4_1, 300, 576, 4, seed=threads)
    args = (torch.from_numpy(x), int(Q.Q4_1), torch.from_numpy(raw), 576)
    original = torch.get_num_threads()
    try:
        cpu.set_num_threads(1)
        one = cpu.qmatmul(*args)
        assert cpu.set_num_threads(threads) == threads
        for _ in range(20):  # many jobs back to back: no chunk lost or run twice
            assert torch.equal(cpu.qmatmul(*args), one)
    finally:
        cpu.set_num_threads(original)


@pytest.mark.parametrize("qtype", TYPES + [Q.F32, Q.F16], ids=lambda t: t.name)
def test_dequantize_bit_identical(isa, qtype):
    rng = np.random.default_rng(int(qtype))
    n, k = 37, 512
    if qtype == Q.F32:
        raw = rng.standard_normal((n, k)).astype(np.float32).view(np.uint8)
    elif qtype == Q.F16:
        raw = rng.standard_normal((n, k)).astype(np.float16).view(np.uint8)
    else:
        raw = random_blocks(qtype, n, k, rng)
    ref = gguf_dequantize(raw, qtype).astype(np.float32).reshape(n, k) if qtype not in (Q.F32, Q.F16) \
        else raw.view(np.float32 if qtype == Q.F32 else np.float16).astype(np.float32)
    packed = torch.from_numpy(raw)
    assert np.array_equal(cpu.dequantize(int(qtype), packed, k).numpy(), ref)
    rows = torch.tensor([5, 0, 36, 5])
    assert np.array_equal(cpu.dequantize(int(qtype), packed, k, rows).numpy(), ref[[5, 0, 36, 5]])


def test_bad_shapes_are_errors():
    raw = torch.zeros(4, 18, dtype=torch.uint8)
    with pytest.raises(ValueError, match="qmatmul failed"):
        cpu.qmatmul(torch.zeros(1, 48), int(Q.Q4_0), raw, 48)  # k not a multiple of the block
    with pytest.raises(ValueError, match="qmatmul failed"):
        cpu.qmatmul(torch.zeros(1, 32), 99, raw, 32)  # not a packed type


def test_isa_reported():
    assert cpu.isa() in cpu.ISA_LEVELS
    assert "portable" in ISAS


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_batch(isa, qtype):
    """A row's product is bit-identical alone, in a batch of 3 (one-row kernel), 6 (8-row kernel), 13 (8-row
    kernel, or AMX tiles from 9 rows) or 37 (16-row kernel where the CPU has AVX-512, AMX tiles where it
    has AMX)."""
    raw, _, x = case(qtype, 37, 512, 37, seed=int(qtype))
    args = (int(qtype), torch.from_numpy(raw), 512)
    xt = torch.from_numpy(x)
    together = cpu.qmatmul(xt, *args)
    for i in range(37):
        assert torch.equal(cpu.qmatmul(xt[i:i + 1], *args), together[i:i + 1]), (isa, i)
    assert torch.equal(cpu.qmatmul(xt[4:7], *args), together[4:7])
    assert torch.equal(cpu.qmatmul(xt[10:16], *args), together[10:16])
    assert torch.equal(cpu.qmatmul(xt[20:33], *args), together[20:33])


def attention_case(block_size, dim, lens, heads=6, kv_heads=2, seed=0):
    """A paged cache holding one sequence per entry of `lens` (its blocks shuffled), K transposed within each
    block as the kernel keeps it, and one query row per sequence attending to its whole length."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    order = torch.randperm(sum(per_seq) + 1, generator=g)  # block 0..: scattered, one spare
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.long)
    k = torch.randn(len(lens), max(lens), kv_heads, dim, generator=g)
    v = torch.randn(len(lens), max(lens), kv_heads, dim, generator=g)
    k_cache = torch.zeros(order.numel(), kv_heads, dim, block_size)
    v_cache = torch.zeros(order.numel(), block_size, kv_heads, dim)
    used = 0
    for s, n in enumerate(lens):
        for b in range(per_seq[s]):
            blk = int(order[used])
            used += 1
            tables[s, b] = blk
            piece = slice(b * block_size, min(n, (b + 1) * block_size))
            width = piece.stop - piece.start
            k_cache[blk, :, :, :width] = k[s, piece].permute(1, 2, 0)
            v_cache[blk, :width] = v[s, piece]
    q = torch.randn(len(lens), heads, dim, generator=g)
    return q, k, v, k_cache, v_cache, tables


@pytest.mark.parametrize("block_size,dim", [(16, 64), (16, 128), (16, 32), (4, 64), (16, 48), (8, 80)])
def test_attention_matches_softmax_reference(block_size, dim):
    lens = [1, 15, 16, 17, 40, 100]
    q, k, v, k_cache, v_cache, tables = attention_case(block_size, dim, lens)
    out = cpu.attention(q, k_cache, v_cache, tables, torch.arange(len(lens)), torch.tensor(lens))
    for s, n in enumerate(lens):
        kk = k[s, :n].double().repeat_interleave(3, dim=1)  # [n, heads, dim]: 3 query heads per kv head
        vv = v[s, :n].double().repeat_interleave(3, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[s].double(), kk) / dim ** 0.5
        ref = torch.einsum("hn,nhd->hd", scores.softmax(-1), vv)
        assert torch.allclose(out[s].double(), ref, atol=2e-5, rtol=1e-4), (block_size, dim, n)


@pytest.mark.parametrize("block_size", [16, 4])
def test_attention_rows_do_not_depend_on_the_batch(block_size):
    """A causal prefill's rows equal the same positions attended one at a time, bit for bit."""
    n = 37
    q, _, _, k_cache, v_cache, tables = attention_case(block_size, 64, [n])
    queries = torch.randn(n, 6, 64)
    together = cpu.attention(queries, k_cache, v_cache, tables, torch.zeros(n, dtype=torch.long),
                             torch.arange(1, n + 1))
    for i in [0, 5, 15, 16, 36]:
        alone = cpu.attention(queries[i:i + 1], k_cache, v_cache, tables, torch.zeros(1, dtype=torch.long),
                              torch.tensor([i + 1]))
        assert torch.equal(alone, together[i:i + 1])
