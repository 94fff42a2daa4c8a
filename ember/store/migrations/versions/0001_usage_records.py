"""usage_records: one row per finished request (ember.store.usage).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("error_type", sa.String(64)),
        sa.Column("streamed", sa.Boolean(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("ttft", sa.Float()),
        sa.Column("latency", sa.Float(), nullable=False),
        sa.Column("queue_time", sa.Float()),
        sa.Column("user", sa.String(256)),
        sa.Column("prompt_cache_key", sa.String(256)),
        sa.Column("session_affinity", sa.String(256)),
        sa.Column("multi_turn_session_id", sa.String(256)),
        sa.Column("metadata", sa.JSON()),
    )
    op.create_index("ix_usage_records_ts", "usage_records", ["ts"])
    op.create_index("ix_usage_records_model_ts", "usage_records", ["model", "ts"])


def downgrade() -> None:
    op.drop_table("usage_records")
