"""The database connection and its schema: one SQLAlchemy engine per store, migrated to the newest schema
by Alembic when it opens (the revisions live in migrations/versions, one table family per revision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, MetaData, create_engine, event

METADATA = MetaData()  # every table module registers its tables here; the migrations create them
MIGRATIONS = Path(__file__).parent / "migrations"


def connect(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True, future=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL: readers (the usage API) never wait for the writer thread, and a commit survives kill -9
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def storable(value: Any) -> Any:
    """The value with every string storable: a client's lone surrogates (legal in JSON, not in UTF-8) escaped as
    `\\ud800`, as the error bodies write them, through JSON's dicts and lists."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value
