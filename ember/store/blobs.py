"""File contents under the data directory (uploads, datasets, batch outputs); their metadata is in the database.

A file is written to a temporary name, flushed to disk and renamed into place, so a reader (or a restart after
kill -9) sees either the whole file or none of it."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

CHUNK = 1 << 20


class TooLarge(Exception):
    """An upload past the size limit; what was written is removed."""


class Blobs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{relative!r} leaves the data directory")
        return path

    def _publish(self, relative: str, tmp: Path) -> None:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path(relative))

    def _tmp(self, relative: str) -> Path:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f".{target.name}.partial")

    def write_lines(self, relative: str, lines: Iterable[bytes]) -> int:
        """Write lines (each ending in a newline) as the file `relative`; its size in bytes."""
        tmp, size = self._tmp(relative), 0
        with open(tmp, "wb") as f:
            for line in lines:
                f.write(line)
                size += len(line)
        self._publish(relative, tmp)
        return size

    async def receive(self, relative: str, chunks: AsyncIterator[bytes], limit: int) -> int:
        """Write an upload as it arrives; TooLarge past `limit` bytes (nothing is kept then)."""
        tmp, size = self._tmp(relative), 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"the file exceeds {limit} bytes")
                    f.write(chunk)
            self._publish(relative, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def remove_tree(self, relative: str) -> None:
        shutil.rmtree(self.path(relative), ignore_errors=True)
