"""Durable state on SQLAlchemy: SQLite in the data directory by default, any database by URL (PostgreSQL
through psycopg). One module per table family (usage.py; responses, files and batch jobs add theirs
beside it); the schema is migrated by Alembic when the store opens; writes from the request path go
through a BufferedWriter so that the database never slows or fails an inference request."""

from __future__ import annotations

from sqlalchemy import Engine

from ember.store.config import StoreConfig
from ember.store.db import connect, migrate
from ember.store.usage import UsageRecord, aggregate, usage_records
from ember.store.writer import BufferedWriter


class Store:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.engine: Engine = connect(config.url())
        migrate(self.engine)
        self.usage = BufferedWriter(self.engine, usage_records, config.write_buffer, config.flush_interval)

    def record_usage(self, record: UsageRecord) -> bool:
        return self.usage.put(record.row())

    def usage_summary(self, start: float, end: float, bucket: str = "hour", model: str | None = None,
                      group_by: str | None = None) -> list[dict]:
        return aggregate(self.engine, start, end, bucket, model, group_by)

    def close(self) -> None:
        self.usage.close()
        self.engine.dispose()


__all__ = ["Store", "StoreConfig", "UsageRecord"]
