"""Store configuration: one dataclass, filled from CLI flags or EMBER_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_data_dir() -> str:
    """A per-user directory (XDG's data home), never the source tree."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "ember")


@dataclass
class StoreConfig:
    usage_records: bool = True  # off: no store is opened, nothing is recorded, /v1/usage answers 404
    data_dir: str | None = None  # None: default_data_dir(); the SQLite file and uploaded files live here
    database_url: str | None = None  # any SQLAlchemy URL (postgresql+psycopg://...); default SQLite in data_dir
    write_buffer: int = 10_000  # records waiting for the database; past it new ones are dropped and counted
    flush_interval: float = 0.5  # seconds between batched writes: what a kill -9 can lose

    def folder(self) -> Path:
        """The data directory (made if missing): the SQLite file, uploaded files, datasets, batch outputs."""
        folder = Path(self.data_dir or default_data_dir()).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.folder() / 'ember.db'}"
