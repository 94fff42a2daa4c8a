"""Opening a GGUF file once and reading its metadata as plain Python values."""

from __future__ import annotations

from pathlib import Path


def open_gguf(path: str | Path):
    """A gguf.GGUFReader (memory-mapped); parsing its metadata is the slow part, so share one."""
    from gguf import GGUFReader

    return GGUFReader(path)


def gguf_field(reader, key: str, default=None):
    """A metadata value as str, number or list, or `default` when the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()
