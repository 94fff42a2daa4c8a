"""Stored Responses API objects (`store: true`): the Response as returned to the client and its input items, so
that `GET /v1/responses[/{id}[/input_items]]` can answer them and a later `previous_response_id` can continue
the conversation. A deleted response's rows are removed outright, so it is unknown everywhere afterwards."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Table,
    select,
    true,
)

from ember.store.db import METADATA, page, storable

MAX_CHAIN = 10_000  # responses in one previous_response_id chain: past it conversation() refuses

responses = Table(  # the schema of migrations/versions/0002_responses.py
    "responses", METADATA,
    Column("id", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("model", String(256), nullable=False),
    Column("status", String(32), nullable=False),
    Column("previous_response_id", String(128)),
    Column("response", JSON, nullable=False),
    Index("ix_responses_created_at_id", "created_at", "id"),  # the listing's order and its cursors
    Index("ix_responses_previous_response_id", "previous_response_id"),
)

response_input_items = Table(  # the primary key's first column indexes response_id
    "response_input_items", METADATA,
    Column("response_id", String(128), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("item_id", String(128)),  # the item's own "id": what the listing's cursors name
    Column("item", JSON, nullable=False),
)


def put(engine: Engine, response: dict[str, Any], input_items: list[dict[str, Any]],
        previous_response_id: str | None) -> None:
    """Store a response and its input items, replacing any stored under its id (a background response is
    stored while in progress and again when it finishes)."""
    response, input_items = storable(response), storable(input_items)
    response_id = response["id"]
    with engine.begin() as connection:
        _remove(connection, response_id)
        connection.execute(responses.insert().values(
            id=response_id, created_at=float(response["created_at"]), model=response["model"],
            status=response["status"], previous_response_id=storable(previous_response_id), response=response))
        if input_items:
            connection.execute(response_input_items.insert(), [
                {"response_id": response_id, "position": i, "item_id": item.get("id"), "item": item}
                for i, item in enumerate(input_items)])


def get(engine: Engine, response_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        return _response(connection, storable(response_id))


def delete(engine: Engine, response_id: str) -> bool:
    """Remove the response and its input items; False when there was none."""
    with engine.begin() as connection:
        return _remove(connection, storable(response_id))


def list_responses(engine: Engine, limit: int = 20, after: str | None = None, before: str | None = None,
                   order: str = "desc") -> tuple[list[dict[str, Any]], bool]:
    """A page of stored responses by (created_at, id) in `order`, and whether more follow it."""
    with engine.connect() as connection:
        return page(connection, responses.c.response, true(), (responses.c.created_at, responses.c.id),
                     responses.c.id, limit, after, before, order)


def list_input_items(engine: Engine, response_id: str, limit: int = 20, after: str | None = None,
                     before: str | None = None, order: str = "desc") -> tuple[list[dict[str, Any]], bool] | None:
    """A page of a response's input items by position in `order` (desc: the last one first, as OpenAI lists
    them), cursors being item ids; None when the response is unknown."""
    response_id = storable(response_id)
    t = response_input_items.c
    with engine.connect() as connection:
        if _response(connection, response_id) is None:
            return None
        return page(connection, t.item, t.response_id == response_id, (t.position,), t.item_id, limit, after,
                     before, order)


def conversation(engine: Engine, response_id: str) -> list[dict[str, Any]] | None:
    """The items a request with previous_response_id=response_id continues: from the root of its chain of
    previous_response_id links down to it, each response's input items then its output items. None when the
    response or any response up its chain is unknown or deleted (a conversation with a hole is not continued);
    ValueError for a cycle or a chain of more than MAX_CHAIN responses."""
    chain: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    with engine.connect() as connection:
        link: str | None = storable(response_id)
        while link is not None:
            if len(chain) == MAX_CHAIN:
                raise ValueError(f"response {response_id!r} continues a chain of more than {MAX_CHAIN} responses")
            if link in seen:
                raise ValueError(f"response {response_id!r} continues a cycle of previous_response_id at {link!r}")
            seen.add(link)
            row = connection.execute(select(responses.c.previous_response_id, responses.c.response)
                                     .where(responses.c.id == link)).first()
            if row is None:
                return None
            chain.append((link, row.response))
            link = row.previous_response_id
        items: list[dict[str, Any]] = []
        t = response_input_items.c
        for link, response in reversed(chain):
            items += connection.execute(select(t.item).where(t.response_id == link).order_by(t.position)).scalars()
            items += response.get("output", [])
    return items


def _response(connection: Connection, response_id: str) -> dict[str, Any] | None:
    return connection.execute(select(responses.c.response).where(responses.c.id == response_id)).scalar()


def _remove(connection: Connection, response_id: str) -> bool:
    connection.execute(response_input_items.delete().where(response_input_items.c.response_id == response_id))
    return connection.execute(responses.delete().where(responses.c.id == response_id)).rowcount > 0
