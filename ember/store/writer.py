"""Rows leave the request path through a bounded buffer that one thread writes to the database in batches.

A request never waits for the database: `put` only appends (or, with the buffer full, drops the row and
counts it). The thread writes everything buffered at least every `flush_interval` seconds, in one
transaction, so a kill -9 loses at most that much; when the database fails it keeps the batch, logs, and
retries with a growing pause, so a slow or unreachable database costs no request anything. A batch the
database refuses while it answers otherwise holds a row it can never take: the rows then go in one by one
and the ones refused are dropped and counted, so one bad row cannot hold back the rest for ever."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from sqlalchemy import Engine, Table, text

log = logging.getLogger("ember.store")


class BufferedWriter:
    def __init__(self, engine: Engine, table: Table, capacity: int = 10_000, flush_interval: float = 0.5) -> None:
        self.engine = engine
        self.table = table
        self.capacity = capacity
        self.flush_interval = flush_interval
        self.dropped = 0  # rows refused because the buffer was full
        self.written = 0
        self.failures = 0  # batches the database refused (each retried)
        self.rejected = 0  # rows the database refused on their own while it took others (dropped)
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"ember-store-{table.name}", daemon=True)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> bool:
        """Queue a row; False (and counted) when the buffer is full. Never blocks on the database."""
        with self._lock:
            if len(self._rows) >= self.capacity:
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    log.warning("store buffer full: rows dropped", extra={"table": self.table.name,
                                                                          "dropped": self.dropped})
                return False
            self._rows.append(row)
        return True

    @property
    def pending(self) -> int:
        return len(self._rows)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything put so far is written (tests, shutdown); False at the timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._rows and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._rows

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pause = self.flush_interval
        while not self._stop:
            self._wake.wait(pause)
            self._wake.clear()
            with self._lock:
                batch = list(self._rows)
            if not batch:
                continue
            try:
                with self.engine.begin() as connection:
                    connection.execute(self.table.insert(), batch)
            except Exception as exc:  # any database failure: keep the rows, try again later
                if self._reachable():
                    self._write_one_by_one(batch)
                    continue
                self.failures += 1
                pause = min(5.0, pause * 2)
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("store write failed; retrying", extra={"table": self.table.name,
                                                                       "error": str(exc)[:200],
                                                                       "failures": self.failures})
                continue
            pause = self.flush_interval
            self._done(len(batch))
            self.written += len(batch)

    def _done(self, count: int) -> None:
        with self._lock:
            for _ in range(count):
                self._rows.popleft()

    def _reachable(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> None:
        for row in batch:
            try:
                with self.engine.begin() as connection:
                    connection.execute(self.table.insert(), [row])
                self.written += 1
            except Exception as exc:
                self.rejected += 1
                log.warning("store refused a row; dropped", extra={"table": self.table.name, "error": str(exc)[:200],
                                                                  "rejected": self.rejected})
        self._done(len(batch))
