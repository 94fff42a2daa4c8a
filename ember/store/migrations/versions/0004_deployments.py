"""deployments: Fireworks deployments (ember.store.deployments), so that they come back after a restart.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("deleted_at", sa.Float()),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("replica_count", sa.Integer(), nullable=False),
        sa.Column("message", sa.String(2048)),
        sa.Column("spec", sa.JSON(), nullable=False),
    )
    op.create_index("ix_deployments_account_created_at_id", "deployments", ["account", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_deployments_account_created_at_id", "deployments")
    op.drop_table("deployments")
