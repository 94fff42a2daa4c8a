"""What routes read from the app's state besides the models."""

from __future__ import annotations

from fastapi import Request

from ember.serving.errors import RequestError
from ember.store import Store


def store_of(request: Request) -> Store:
    """The store, or the 404 of a server that keeps nothing (started with --no-usage-records)."""
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise RequestError("this server keeps no stored objects (it was started with --no-usage-records)", None,
                           404, "not_found")
    return store
