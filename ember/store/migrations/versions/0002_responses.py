"""responses, response_input_items: stored Responses API objects (ember.store.responses).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("previous_response_id", sa.String(128)),
        sa.Column("response", sa.JSON(), nullable=False),
    )
    op.create_index("ix_responses_created_at_id", "responses", ["created_at", "id"])
    op.create_index("ix_responses_previous_response_id", "responses", ["previous_response_id"])
    op.create_table(
        "response_input_items",
        sa.Column("response_id", sa.String(128), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("item_id", sa.String(128)),
        sa.Column("item", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("response_input_items")
    op.drop_table("responses")
