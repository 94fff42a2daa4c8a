"""The database connection and its schema: one SQLAlchemy engine per store, migrated to the newest schema
by Alembic when it opens (the revisions live in migrations/versions, one table family per revision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    MetaData,
    Select,
    Table,
    create_engine,
    event,
    select,
    tuple_,
)

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


def page(connection: Connection, value: Column | Table, where: ColumnElement[bool], keys: tuple[Column, ...],
          id_column: Column, limit: int, after: str | None, before: str | None,
          order: str) -> tuple[list[Any], bool]:
    """One page of `value` over the rows `where`, ordered by the unique `keys` in `order`: rows strictly after
    the row whose id_column is `after` and strictly before the one that is `before`, in the listing's order.
    With `before` alone the page is the rows nearest it (read backwards, then turned round), and has_more says
    whether rows lie beyond the page in the direction read. A Table as `value` gives its rows as dicts."""
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    row_key = tuple_(*keys)

    def cursor(item_id: str) -> ColumnElement[Any]:
        found = connection.execute(select(*keys).where(where, id_column == storable(item_id))).first()
        if found is None:
            raise ValueError(f"cursor {item_id!r} names nothing in this listing")
        return tuple_(*found)

    ascending = order == "asc"
    query: Select = select(value).where(where)
    if after is not None:
        query = query.where(row_key > cursor(after) if ascending else row_key < cursor(after))
    if before is not None:
        query = query.where(row_key < cursor(before) if ascending else row_key > cursor(before))
    backwards = before is not None and after is None
    read_ascending = ascending != backwards
    query = query.order_by(*(k.asc() if read_ascending else k.desc() for k in keys)).limit(limit + 1)
    result = connection.execute(query)
    rows = [dict(r) for r in result.mappings()] if isinstance(value, Table) else list(result.scalars())
    found = rows[:limit]
    return (found[::-1] if backwards else found), len(rows) > limit
