"""The app under uvicorn, with what uvicorn leaves out for a server facing clients it does not control:
a deadline for each request's headers (a client that opens connections and sends half a request would
otherwise hold them forever), a cap on connections, and a drain on SIGTERM or Ctrl-C (new requests get
503, running ones, streams included, finish within --drain-timeout; a second signal stops at once)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ember.api.config import ServerConfig


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request has not finished its headers
    `seconds` after the connection opened or its last answer ended (any data at all resets uvicorn's
    own keep-alive timer, so a client trickling bytes would never be closed)."""

    class HeaderDeadlineH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11


def http_server(app: FastAPI, config: ServerConfig) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, log_level=config.log_level, access_log=False,
        http=header_deadline_protocol(config.header_timeout), timeout_keep_alive=config.timeout_keep_alive,
        limit_concurrency=config.max_connections, timeout_graceful_shutdown=config.drain_timeout))


def install_drain(app: FastAPI, http: uvicorn.Server, stop_now: Callable[[], None]) -> None:
    """SIGTERM / SIGINT: refuse new requests and let uvicorn finish the running ones (it stops accepting
    connections, then waits up to its graceful-shutdown timeout); the second signal stops at once."""

    def on_signal(*_: object) -> None:
        if app.state.draining:
            http.force_exit = True
            stop_now()
        app.state.draining = True
        http.should_exit = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
