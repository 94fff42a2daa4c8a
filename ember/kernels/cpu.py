"""ctypes binding of Ember's C kernels (csrc/ember_kernels.c), built by `pip install` / `make setup`.

ctypes rather than a torch extension: the library needs no torch headers (it builds in seconds with
any C compiler) and a call costs ~2 us, well under a GEMV of even the smallest projection.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import torch

_HERE = Path(__file__).parent
ISA_LEVELS = {"portable": 0, "avx2": 1, "avx-vnni": 2, "avx512-vnni": 3, "avx512-amx": 4}
# ggml types the kernels take packed; others are dequantized at load
PACKED_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


class KernelsUnavailable(RuntimeError):
    pass


# The one-call forward pass's model description (ember_kernels.c: qweight, qlayer, qmodel); it holds raw pointers,
# so whoever builds one keeps the tensors alive.
class QWeight(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int32), ("w", ctypes.c_void_p), ("row_bytes", ctypes.c_int64),
                ("n_out", ctypes.c_int64), ("k", ctypes.c_int64), ("bias", ctypes.c_void_p)]


class QLayer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("n_qkv", ctypes.c_int64),
                ("qkv", QWeight * 3), ("o", QWeight), ("gate_up", QWeight), ("down", QWeight),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class QModel(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64),
                ("block_size", ctypes.c_int64), ("eps", ctypes.c_float), ("cos_t", ctypes.c_void_p),
                ("sin_t", ctypes.c_void_p), ("layers", ctypes.POINTER(QLayer))]


def _library_path() -> Path:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _HERE / f"_ember_kernels{suffix}"
        if candidate.is_file():
            return candidate
    raise KernelsUnavailable(
        "Ember's CPU kernels are not built: run `make setup` (or `pip install -e .`), which compiles "
        "ember/kernels/csrc with the machine's C compiler (gcc or clang; e.g. `apt-get install gcc`), "
        "or serve with --weights float32")


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_library_path()))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ember_init.argtypes = [ctypes.c_int]
    lib.ember_isa.restype = ctypes.c_char_p
    lib.ember_set_num_threads.argtypes = [ctypes.c_int]
    lib.ember_qmatmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.ember_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    lib.ember_attention.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr] + [i64] * 6 + [ctypes.c_float, i64, ptr]
    lib.ember_rms_norm.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, ptr]
    lib.ember_silu_mul.argtypes = [ptr, i64, i64, ptr]
    lib.ember_rope_store.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, ptr]
    lib.ember_forward_layers.argtypes = [ctypes.POINTER(QModel), ptr, i64, ptr, ptr, ptr, ptr, ptr, i64]
    level = os.environ.get("EMBER_KERNEL_ISA", "avx512-amx")
    if level not in ISA_LEVELS:
        raise ValueError(f"EMBER_KERNEL_ISA must be one of {sorted(ISA_LEVELS)}, not {level!r}")
    lib.ember_init(ISA_LEVELS[level])
    lib.ember_set_num_threads(torch.get_num_threads())
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded library (the one process-wide handle; loading it starts the kernel thread pool)."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def available() -> bool:
    try:
        lib()
    except (KernelsUnavailable, OSError):
        return False
    return True


def isa() -> str:
    return lib().ember_isa().decode()


def select_isa(name: str) -> str:
    """Use at most this instruction set (tests run every path the CPU has); returns the one picked."""
    lib().ember_init(ISA_LEVELS[name])
    return isa()


def set_num_threads(n: int) -> int:
    return lib().ember_set_num_threads(n)


def num_threads() -> int:
    """The pool's threads, the caller's included. Engines share it: a kernel call that finds it busy (another
    model's engine is in a kernel) runs on its caller's thread alone."""
    return lib().ember_num_threads()


def qmatmul(x: torch.Tensor, ggml_type: int, packed: torch.Tensor, k: int, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] float32 (rows contiguous) @ W^T (+ bias) for W = `packed` uint8 [n, bytes per row];
    with `residual` [m, n] (rows contiguous), the product is added into it in place and it is returned."""
    m, n = x.shape[0], packed.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=torch.float32) if residual is None else residual
    rc = lib().ember_qmatmul(ggml_type, packed.data_ptr(), packed.stride(0), n, k, x.data_ptr(), x.stride(0), m,
                             out.data_ptr(), out.stride(0), None if bias is None else bias.data_ptr(),
                             residual is not None)
    if rc:
        raise ValueError(f"qmatmul failed ({rc}) for ggml type {ggml_type}, k={k}")
    return out


def dequantize(ggml_type: int, packed: torch.Tensor, k: int, rows: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `rows` (int64, default all) of W = `packed` uint8 [n, bytes per row] as float32 [len, k]."""
    n = packed.shape[0] if rows is None else rows.numel()
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    rc = lib().ember_dequantize(ggml_type, packed.data_ptr(), packed.stride(0), k,
                                None if rows is None else rows.data_ptr(), n, out.data_ptr())
    if rc:
        raise ValueError(f"dequantize failed for ggml type {ggml_type}, k={k}")
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_blocks: torch.Tensor,
              row_seq: torch.Tensor, row_lengths: torch.Tensor, scale: float | None = None,
              window: int | None = None) -> torch.Tensor:
    """Attention of every query row read in place from the paged cache (no gather): row i attends to the
    first row_lengths[i] slots of sequence row_seq[i]'s blocks (causal for a prefill chunk's rows), or with
    a `window` only to the last `window` of them (a sliding-window layer). Scores are scaled by `scale`
    (default head_dim ** -0.5).

    q [rows, heads, dim] float32; k_cache [blocks, kv_heads, dim, block_size] (transposed within each block), v_cache
    [blocks, block_size, kv_heads, dim]; seq_blocks int64 [sequences, max blocks]; row_seq and row_lengths
    int64 [rows].
    """
    rows, heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    out = torch.empty(rows, heads, dim)
    lib().ember_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), seq_blocks.data_ptr(),
                          row_seq.data_ptr(), row_lengths.data_ptr(), rows, heads, v_cache.shape[2], dim,
                          v_cache.shape[1], seq_blocks.shape[1], dim ** -0.5 if scale is None else scale, window or 0,
                          out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension of x [n, d] (rows contiguous)."""
    n, d = x.shape
    out = torch.empty(n, d)
    lib().ember_rms_norm(x.data_ptr(), x.stride(0), n, d, weight.data_ptr(), eps, out.data_ptr())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up], [n, 2 * inter] contiguous."""
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(n, inter)
    lib().ember_silu_mul(gate_up.data_ptr(), n, inter, out.data_ptr())
    return out


def rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
               kv_heads: int, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Rotary embedding of q and k in place in qkv [n, (heads + 2 kv_heads) * dim], then k and v into the
    caches at `slots` (int64 flat slot per row), in `attention`'s layouts. cos / sin: [positions, dim / 2]."""
    dim = v_cache.shape[-1]
    lib().ember_rope_store(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], positions.data_ptr(), cos.data_ptr(),
                           sin.data_ptr(), heads, kv_heads, dim, slots.data_ptr(), v_cache.shape[1],
                           k_cache.data_ptr(), v_cache.data_ptr())


def qweight(ggml_type: int, packed: torch.Tensor, k: int, bias: torch.Tensor | None) -> QWeight:
    return QWeight(ggml_type, packed.data_ptr(), packed.stride(0), packed.shape[0], k,
                   None if bias is None else bias.data_ptr())


def forward_layers(model: QModel, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   seq_blocks: torch.Tensor, row_seq: torch.Tensor, row_lengths: torch.Tensor) -> None:
    """Every decoder layer of `model` for a batch of tokens, in one call; h [rows, hidden] in place.
    The rows' cache metadata is `attention`'s."""
    rc = lib().ember_forward_layers(ctypes.byref(model), h.data_ptr(), h.shape[0], positions.data_ptr(),
                                    slots.data_ptr(), seq_blocks.data_ptr(), row_seq.data_ptr(), row_lengths.data_ptr(),
                                    seq_blocks.shape[1])
    if rc:
        raise RuntimeError(f"forward pass failed ({rc})")
