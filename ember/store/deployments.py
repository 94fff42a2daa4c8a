"""Fireworks deployments: what a client asked for (`spec`, in the API's own camelCase words), the replicas it
wants now and where its life stands, so that a restarted server brings its deployments back."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, Engine, Float, Index, Integer, String, Table, and_, func, select
from sqlalchemy.exc import IntegrityError

from ember.store.db import METADATA, storable

deployments = Table(  # the schema of migrations/versions/0004_deployments.py
    "deployments", METADATA,
    Column("account", String(128), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("deleted_at", Float),  # soft-deleted: listed with showDeleted, back with :undelete
    Column("state", String(32), nullable=False),  # CREATING, READY, UPDATING, FAILED, DELETING, DELETED
    Column("replica_count", Integer, nullable=False),  # wanted now: what :scale, autoscaling and idleness set
    Column("message", String(2048)),  # why it FAILED
    Column("spec", JSON, nullable=False),
    Index("ix_deployments_account_created_at_id", "account", "created_at", "id"),
)


class DeploymentStore:
    """Each call is one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, row: dict[str, Any]) -> bool:
        """False when the account has a deployment of that id (deleted ones included: undelete it instead)."""
        try:
            with self.engine.begin() as c:
                if c.execute(select(deployments.c.id).where(self._key(row["account"], row["id"]))).first():
                    return False
                c.execute(deployments.insert().values(**storable(row)))
        except IntegrityError:  # made by another server on the same database meanwhile
            return False
        return True

    def get(self, account: str, deployment_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(select(deployments).where(self._key(account, deployment_id))).mappings().first()
        return dict(row) if row else None

    def update(self, account: str, deployment_id: str, **values: Any) -> dict[str, Any] | None:
        """Set fields; the row after it, or None when there is none."""
        with self.engine.begin() as c:
            key = self._key(account, deployment_id)
            row = c.execute(select(deployments).where(key).with_for_update()).mappings().first()
            if row is None:
                return None
            c.execute(deployments.update().where(key).values(**storable(values)))
            return {**dict(row), **values}

    def list(self, account: str, offset: int, limit: int, show_deleted: bool) -> tuple[list[dict[str, Any]], int]:
        """A page of the account's deployments, oldest first, and how many there are in all."""
        t = deployments.c
        where = t.account == account if show_deleted else and_(t.account == account, t.deleted_at.is_(None))
        with self.engine.connect() as c:
            rows = [dict(r) for r in c.execute(select(deployments).where(where).order_by(t.created_at, t.id)
                                               .offset(offset).limit(limit)).mappings()]
            total = c.execute(select(func.count()).select_from(deployments).where(where)).scalar_one()
        return rows, total

    def live(self) -> list[dict[str, Any]]:
        """Every deployment not deleted: what a starting server brings back."""
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(select(deployments).where(deployments.c.deleted_at.is_(None))
                                               .order_by(deployments.c.created_at)).mappings()]

    def delete(self, account: str, deployment_id: str) -> None:
        """For good (a hard delete)."""
        with self.engine.begin() as c:
            c.execute(deployments.delete().where(self._key(account, deployment_id)))

    @staticmethod
    def _key(account: str, deployment_id: str):  # noqa: ANN205 (a SQLAlchemy clause)
        return and_(deployments.c.account == account, deployments.c.id == deployment_id)
