"""Durable state on SQLAlchemy: SQLite in the data directory by default, any database by URL (PostgreSQL
through psycopg). One module per table family (usage, responses, files and datasets, batch jobs,
deployments); the
schema is migrated by Alembic when the store opens; writes from the request path go through a
BufferedWriter so that the database never slows or fails an inference request. File contents (uploads,
datasets, batch outputs) live in the data directory whatever the database (ember.store.blobs)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from ember.store import responses
from ember.store.batches import BatchStore
from ember.store.blobs import Blobs
from ember.store.config import StoreConfig
from ember.store.db import connect, migrate
from ember.store.deployments import DeploymentStore
from ember.store.files import FileStore
from ember.store.usage import UsageRecord, aggregate, usage_records
from ember.store.writer import BufferedWriter


class Store:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.engine: Engine = connect(config.url())
        migrate(self.engine)
        self.usage = BufferedWriter(self.engine, usage_records, config.write_buffer, config.flush_interval)
        self.blobs = Blobs(config.folder())
        self.files = FileStore(self.engine, self.blobs)
        self.batches = BatchStore(self.engine)
        self.deployments = DeploymentStore(self.engine)

    def record_usage(self, record: UsageRecord) -> bool:
        return self.usage.put(record.row())

    def usage_summary(self, start: float, end: float, bucket: str = "hour", model: str | None = None,
                      group_by: str | None = None) -> list[dict]:
        return aggregate(self.engine, start, end, bucket, model, group_by)

    # Responses API objects (ember.store.responses): each call is one transaction, run off the event loop
    def put_response(self, response: dict[str, Any], input_items: list[dict[str, Any]],
                     previous_response_id: str | None) -> None:
        responses.put(self.engine, response, input_items, previous_response_id)

    def get_response(self, response_id: str) -> dict[str, Any] | None:
        return responses.get(self.engine, response_id)

    def delete_response(self, response_id: str) -> bool:
        return responses.delete(self.engine, response_id)

    def list_responses(self, limit: int = 20, after: str | None = None, before: str | None = None,
                       order: str = "desc") -> tuple[list[dict[str, Any]], bool]:
        return responses.list_responses(self.engine, limit, after, before, order)

    def list_input_items(self, response_id: str, limit: int = 20, after: str | None = None, before: str | None = None,
                         order: str = "desc") -> tuple[list[dict[str, Any]], bool] | None:
        return responses.list_input_items(self.engine, response_id, limit, after, before, order)

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        return responses.conversation(self.engine, response_id)

    def close(self) -> None:
        self.usage.close()
        self.engine.dispose()


__all__ = ["Store", "StoreConfig", "UsageRecord"]
