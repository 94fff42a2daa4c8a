"""files, datasets, batch_jobs, batch_results: uploaded files, Fireworks datasets and batch jobs with each line's
result (ember.store.files, ember.store.batches); usage_records.batch_id names the job a line ran for.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Float()),
        sa.Column("path", sa.String(1024), nullable=False),
    )
    op.create_index("ix_files_created_at_id", "files", ["created_at", "id"])
    op.create_table(
        "datasets",
        sa.Column("account", sa.String(128), primary_key=True),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("example_count", sa.Integer(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
    )
    op.create_table(
        "batch_jobs",
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("shape", sa.String(16), nullable=False),
        sa.Column("account", sa.String(128)),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_path", sa.String(1024), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("times", sa.JSON(), nullable=False),
        sa.Column("errors", sa.JSON()),
        sa.Column("spec", sa.JSON(), nullable=False),
    )
    op.create_index("ix_batch_jobs_created_at_id", "batch_jobs", ["created_at", "id"])
    op.create_table(
        "batch_results",
        sa.Column("job_id", sa.String(256), primary_key=True),
        sa.Column("line", sa.Integer(), primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
    )
    op.add_column("usage_records", sa.Column("batch_id", sa.String(256)))


def downgrade() -> None:
    op.drop_column("usage_records", "batch_id")
    op.drop_table("batch_results")
    op.drop_table("batch_jobs")
    op.drop_table("datasets")
    op.drop_table("files")
