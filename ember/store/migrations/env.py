"""Alembic's entry point: migrations run on the connection the store hands over (ember.store.db.migrate)."""

from __future__ import annotations

from alembic import context

context.configure(connection=context.config.attributes["connection"], render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
