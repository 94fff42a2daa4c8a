"""Uploaded files (OpenAI's /v1/files) and Fireworks datasets: their metadata here, their contents in the data
directory (ember.store.blobs). Deleting one removes both; an expired file is gone as if deleted."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Engine, Float, Index, Integer, String, Table, and_, func, or_, select

from ember.store.blobs import Blobs
from ember.store.db import METADATA, page

files = Table(  # the schema of migrations/versions/0003_batches.py
    "files", METADATA,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("expires_at", Float),
    Column("path", String(1024), nullable=False),  # under the data directory
    Index("ix_files_created_at_id", "created_at", "id"),
)

datasets = Table(
    "datasets", METADATA,
    Column("account", String(128), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("state", String(32), nullable=False),  # UPLOADING (no contents yet) or READY
    Column("example_count", Integer, nullable=False),
    Column("files", JSON, nullable=False),  # filename -> bytes, under datasets/<account>/<id>/
    Column("meta", JSON, nullable=False),  # the fields the client gave (displayName, format, sourceJobName, ...)
)


def dataset_folder(account: str, dataset_id: str) -> str:
    return f"datasets/{account}/{dataset_id}"


class FileStore:
    """Files and datasets; each call is one transaction, run off the event loop."""

    def __init__(self, engine: Engine, blobs: Blobs) -> None:
        self.engine, self.blobs = engine, blobs

    # files
    def put_file(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            c.execute(files.insert().values(**row))

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(select(files).where(files.c.id == file_id, _live())).mappings().first()
        return dict(row) if row else None

    def list_files(self, limit: int, after: str | None, order: str, purpose: str | None) -> tuple[list[dict], bool]:
        where = and_(_live(), *([files.c.purpose == purpose] if purpose else []))
        with self.engine.connect() as c:
            return page(c, files, where, (files.c.created_at, files.c.id), files.c.id, limit, after, None, order)

    def delete_file(self, file_id: str) -> bool:
        with self.engine.begin() as c:
            row = c.execute(select(files.c.path).where(files.c.id == file_id, _live())).first()
            if row is None:
                return False
            c.execute(files.delete().where(files.c.id == file_id))
        self.blobs.remove(row.path)
        return True

    def sweep_expired(self) -> int:
        """Remove the files whose expiry has passed; how many."""
        with self.engine.begin() as c:
            gone = c.execute(select(files.c.id, files.c.path).where(files.c.expires_at <= time.time())).all()
            if gone:
                c.execute(files.delete().where(files.c.id.in_([g.id for g in gone])))
        for g in gone:
            self.blobs.remove(g.path)
        return len(gone)

    # datasets
    def put_dataset(self, row: dict[str, Any]) -> bool:
        """Create a dataset; False when one of that id exists in the account."""
        with self.engine.begin() as c:
            if c.execute(select(datasets.c.id).where(*_dataset(row["account"], row["id"]))).first():
                return False
            c.execute(datasets.insert().values(**row))
        return True

    def get_dataset(self, account: str, dataset_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(select(datasets).where(*_dataset(account, dataset_id))).mappings().first()
        return dict(row) if row else None

    def update_dataset(self, account: str, dataset_id: str, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(datasets.update().where(*_dataset(account, dataset_id)).values(updated_at=time.time(), **values))

    def list_datasets(self, account: str, offset: int, limit: int, descending: bool, by_time: bool
                      ) -> tuple[list[dict[str, Any]], int]:
        """A page of an account's datasets ordered by name or creation time, and how many it has in all."""
        key = datasets.c.created_at if by_time else datasets.c.id
        keys = (key.desc(), datasets.c.id.desc()) if descending else (key.asc(), datasets.c.id.asc())
        where = datasets.c.account == account
        with self.engine.connect() as c:
            rows = c.execute(select(datasets).where(where).order_by(*keys).offset(offset).limit(limit)).mappings()
            found = [dict(r) for r in rows]
            total = c.execute(select(func.count()).select_from(datasets).where(where)).scalar_one()
        return found, total

    def delete_dataset(self, account: str, dataset_id: str) -> bool:
        with self.engine.begin() as c:
            if c.execute(datasets.delete().where(*_dataset(account, dataset_id))).rowcount == 0:
                return False
        self.blobs.remove_tree(dataset_folder(account, dataset_id))
        return True


def _live() -> Any:
    return or_(files.c.expires_at.is_(None), files.c.expires_at > time.time())


def _dataset(account: str, dataset_id: str) -> tuple:
    return datasets.c.account == account, datasets.c.id == dataset_id
