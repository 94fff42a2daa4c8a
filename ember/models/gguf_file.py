"""A GGUF file's metadata and tensor table, read straight from a memory map.

`gguf.GGUFReader` builds a Python object per array element of the metadata and takes over a second
on a 49k-token vocabulary; parsing the header with `struct` takes ~30 ms. Tensor data stays in the
map until the loader dequantizes it (with `gguf.quants`, which knows every quantization type).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_GGUF_MAGIC = b"GGUF"
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "u1",
               10: "u8", 11: "i8", 12: "f8"}


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
    data: np.ndarray  # raw bytes, shaped [..., bytes per row], a view of the file map


@dataclass
class GGUFFile:
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    def __init__(self, buf: memoryview, endian: str, len_fmt: str, off: int) -> None:
        self.buf, self.off, self.endian = buf, off, endian
        self.length = struct.Struct(endian + len_fmt)
        self.u32 = struct.Struct(endian + "I")

    def unpack(self, s: struct.Struct) -> Any:
        (value,) = s.unpack_from(self.buf, self.off)
        self.off += s.size
        return value

    def string(self) -> str:
        n = self.unpack(self.length)
        value = str(self.buf[self.off:self.off + n], "utf-8", "replace")
        self.off += n
        return value

    def value(self, vtype: int, key: str) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype in _GGUF_SCALARS:
            return self.unpack(struct.Struct(self.endian + _GGUF_SCALARS[vtype]))
        if vtype != _GGUF_ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype} for key {key!r}")
        etype, count = self.unpack(self.u32), self.unpack(self.length)
        if etype == _GGUF_STRING:
            return [self.string() for _ in range(count)]
        if etype not in _GGUF_NUMPY:
            raise ValueError(f"unsupported GGUF array element type {etype} for key {key!r}")
        dtype = np.dtype(self.endian + _GGUF_NUMPY[etype])
        value = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.off).copy()
        self.off += count * dtype.itemsize
        return value


def _header(buf: memoryview) -> tuple[_Cursor, int, dict[str, Any]]:
    if bytes(buf[:4]) != _GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<" if version < 0x10000 else ">"  # a big-endian file's version reads as a huge number
    if endian == ">":
        (version,) = struct.unpack_from(">I", buf, 4)
    if version == 1:
        n_tensors, n_kv = struct.unpack_from(endian + "II", buf, 8)
        cur = _Cursor(buf, endian, "I", 16)
    else:
        n_tensors, n_kv = struct.unpack_from(endian + "QQ", buf, 8)
        cur = _Cursor(buf, endian, "Q", 24)
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack(cur.u32), key)
    return cur, n_tensors, metadata


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata only: numeric arrays as numpy arrays, string arrays as lists of str."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _header(buf)[2]
        finally:
            buf.release()


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor table; tensor data are views of a read-only map of the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur, n_tensors, metadata = _header(memoryview(raw))
    u64 = struct.Struct(cur.endian + "Q")
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack(u64) for _ in range(cur.unpack(cur.u32))]
        infos.append((name, cur.unpack(cur.u32), tuple(reversed(dims)), cur.unpack(u64)))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cur.off // alignment) * alignment
    tensors = []
    for name, ggml_type, shape, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        row_bytes = shape[-1] // block * type_size
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        data = raw[start + offset:start + offset + rows * row_bytes].reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, ggml_type, shape, data))
    return GGUFFile(metadata, tensors)
