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
ISA_LEVELS = {"portable": 0, "avx2": 1, "avx-vnni": 2}
# ggml types the kernels take packed; others are dequantized at load
PACKED_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


class KernelsUnavailable(RuntimeError):
    pass


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
    lib.ember_block_bytes.argtypes = lib.ember_block_elems.argtypes = [ctypes.c_int]
    lib.ember_qmatmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, ptr]
    lib.ember_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    lib.ember_decode_attention.argtypes = [ptr, ptr, ptr, ptr, ptr] + [i64] * 6 + [ctypes.c_float, ptr]
    level = os.environ.get("EMBER_KERNEL_ISA", "avx-vnni")
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


def block_shape(ggml_type: int) -> tuple[int, int]:
    """(values, bytes) of one block of a packed type."""
    return lib().ember_block_elems(ggml_type), lib().ember_block_bytes(ggml_type)


def qmatmul(x: torch.Tensor, ggml_type: int, packed: torch.Tensor, k: int, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] float32 (rows contiguous) @ W^T (+ bias) for W = `packed` uint8 [n, bytes per row]."""
    m, n = x.shape[0], packed.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    rc = lib().ember_qmatmul(ggml_type, packed.data_ptr(), packed.stride(0), n, k, x.data_ptr(), x.stride(0), m,
                             out.data_ptr(), out.stride(0), None if bias is None else bias.data_ptr())
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


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """Single-token decode attention read in place from the paged cache (no gather).

    q [batch, heads, dim] float32; caches [blocks, block_size, kv_heads, dim]; block_tables int64
    [batch, max blocks]; lengths int64 [batch] (context length, the new token included).
    """
    batch, heads, dim = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    lib().ember_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                                 lengths.data_ptr(), batch, heads, k_cache.shape[2], dim, k_cache.shape[1],
                                 block_tables.shape[1], dim ** -0.5, out.data_ptr())
    return out
