"""The durable store on SQLite and on a real PostgreSQL server: migrations at open, batched writes off the
caller's path, aggregates, a database that goes away and comes back, and a kill -9 losing at most the last
flush interval. PostgreSQL is Debian's package (`.ci/run` installs it); the test fails, not skips, without it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select

from ember.store import Store, StoreConfig, UsageRecord
from ember.store.usage import usage_records
from tests.server import _free_port

PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str:
    found = sorted(PG_BIN.glob(f"*/bin/{name}")) or ([Path(p)] if (p := shutil.which(name)) else [])
    assert found, f"PostgreSQL's {name} is missing: apt-get install postgresql (.ci/run does)"
    return str(found[-1])


class Postgres:
    """A throwaway server in a temporary directory on a free loopback port (as user postgres when root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ember-pg-"))
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self._run(_pg_tool("initdb"), "-D", str(self.dir / "data"), "-U", "ember", "--auth=trust", "-E", "UTF8")
        self.start()
        self._run(_pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "ember", "ember")
        self.url = f"postgresql+psycopg://ember@127.0.0.1:{self.port}/ember"

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(_pg_tool("pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run(_pg_tool("pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # a test may have left it stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    yield server
    server.remove()


def clean_store_config(request, tmp_path: Path, tables: list, **kw) -> StoreConfig:
    """A store config on SQLite in tmp_path or on the module's PostgreSQL (request.param), those tables
    emptied first: one config per test, both databases."""
    if request.param == "sqlite":
        return StoreConfig(data_dir=str(tmp_path), **kw)
    config = StoreConfig(database_url=request.getfixturevalue("postgres").url, **kw)
    store = Store(config)
    with store.engine.begin() as connection:
        for table in tables:
            connection.execute(table.delete())
    store.close()
    return config


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request, tmp_path) -> StoreConfig:
    return clean_store_config(request, tmp_path, [usage_records], flush_interval=0.1)


def _record(i: int, ts: float, **kw) -> UsageRecord:
    return UsageRecord(**{"ts": ts, "request_id": f"req-{i}", "endpoint": "chat.completions", "model": f"m{i % 2}",
                          "status": 200, "latency": 0.1 + i / 1000, "ttft": 0.01 + i / 10000, "prompt_tokens": 10,
                          "cached_tokens": 4, "completion_tokens": 7, **kw})


def _count(store: Store) -> int:
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(usage_records)).scalar_one()


def test_migrations_run_at_open_and_again_harmlessly(store_config):
    first = Store(store_config)
    assert "usage_records" in inspect(first.engine).get_table_names()
    first.record_usage(_record(1, time.time()))
    assert first.usage.flush()
    first.close()
    again = Store(store_config)  # already at the newest revision: nothing changes, nothing lost
    assert _count(again) == 1
    again.close()


def test_records_and_aggregates(store_config):
    store = Store(store_config)
    hour = 3600 * (int(time.time()) // 3600 - 5)  # a whole hour five hours ago, and the one after it
    sent = [_record(i, hour + i * 30, status=200 if i % 5 else 429, error_type=None if i % 5 else "rate_limit_error",
                    user=f"u{i % 3}", metadata={"team": "a"}) for i in range(200)]  # 100 minutes of records
    start = time.monotonic()
    for r in sent:
        assert store.record_usage(r)
    assert time.monotonic() - start < 0.5  # the caller never waits for the database
    assert store.usage.flush()
    buckets = store.usage_summary(hour, hour + 7200, "hour", group_by="model")
    assert [(b["start"], b["group"]) for b in buckets] == [(hour, "m0"), (hour, "m1"), (hour + 3600, "m0"),
                                                           (hour + 3600, "m1")]
    first_hour = [r for r in sent if r.ts < hour + 3600]
    assert sum(b["requests"] for b in buckets[:2]) == len(first_hour) == 120
    assert sum(b["errors"] for b in buckets) == 40
    assert sum(b["prompt_tokens"] for b in buckets) == 2000 and sum(b["cached_tokens"] for b in buckets) == 800
    m0 = sorted(r.latency for r in first_hour if r.model == "m0")
    assert buckets[0]["latency_p50"] == pytest.approx(m0[len(m0) // 2 - 1])
    only_m1 = store.usage_summary(hour, hour + 7200, "day", model="m1")
    assert len(only_m1) == 1 and only_m1[0]["requests"] == 100
    by_user = store.usage_summary(hour, hour + 7200, "minute", group_by="user")
    assert sum(b["requests"] for b in by_user) == 200 and {b["group"] for b in by_user} == {"u0", "u1", "u2"}
    store.close()


def test_unreachable_database_costs_the_caller_nothing(postgres):
    store = Store(StoreConfig(database_url=postgres.url, flush_interval=0.1, write_buffer=500))
    with store.engine.begin() as connection:
        connection.execute(usage_records.delete())
    postgres.stop()
    try:
        start = time.monotonic()
        accepted = sum(store.record_usage(_record(i, time.time())) for i in range(800))
        assert time.monotonic() - start < 0.5
        assert accepted == 500 and store.usage.dropped == 300  # a full buffer drops and counts, never blocks
        time.sleep(0.5)
        assert store.usage.failures >= 1 and store.usage.pending == 500
    finally:
        postgres.start()
    assert store.usage.flush(timeout=20)  # the kept batch lands once the database is back
    assert _count(store) == 500
    store.close()


WRITER = """
import sys, time
from ember.store import Store, StoreConfig, UsageRecord
store = Store(StoreConfig(database_url=sys.argv[1], flush_interval=0.5))
i = 0
while True:
    store.record_usage(UsageRecord(ts=time.time(), request_id=str(i), endpoint="e", model="m", status=200,
                                   latency=0.0))
    i += 1
    if i % 100 == 0:
        print(i, time.time(), flush=True)
    time.sleep(0.001)
"""


def test_kill_9_loses_at_most_the_last_second(store_config):
    if store_config.database_url is None:
        store_config.database_url = f"sqlite:///{Path(store_config.data_dir) / 'ember.db'}"
    Store(store_config).close()  # create the schema, empty
    proc = subprocess.Popen([sys.executable, "-c", WRITER, store_config.database_url], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parent.parent)
    progress = []
    start = time.monotonic()
    while time.monotonic() - start < 3:
        progress.append(proc.stdout.readline().split())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.time()
    put_by = max(int(n) for n, t in progress if float(t) < killed - 1.0)  # rows put more than 1 s before the kill
    store = Store(store_config)
    assert _count(store) >= put_by > 0
    store.close()


def test_a_row_the_database_refuses_holds_back_no_other(store_config):
    """A client's lone surrogate is stored escaped; a row the database can never take (here: metadata that
    is not JSON) is dropped and counted, and the rows around it are written."""
    store = Store(store_config)
    now = time.time()
    assert store.record_usage(_record(1, now, model="\ud800x"))
    store.usage.put({**_record(2, now).row(), "metadata": {"bad": object()}})
    assert store.record_usage(_record(3, now))
    assert store.usage.flush()
    with store.engine.connect() as connection:
        rows = connection.execute(select(usage_records.c.request_id, usage_records.c.model)
                                  .order_by(usage_records.c.id)).all()
    assert [tuple(r) for r in rows] == [("req-1", "\\ud800x"), ("req-3", "m1")]
    assert store.usage.rejected == 1
    store.close()
