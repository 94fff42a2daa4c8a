"""Batch jobs (OpenAI's batches and Fireworks' batch inference jobs in one table) and each input line's result.

A line's result and the job's counters change in one transaction, and a result's key is (job, line): a job
resumed after kill -9 runs exactly the lines with no result yet, so every line ends up in the output once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Table,
    and_,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError

from ember.store.db import METADATA, page, storable

# a job's life; each shape names these its own way (ember.api.batch.views)
ACTIVE = ("validating", "pending", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "cancelled", "expired")
CANCELLABLE = ("validating", "pending", "in_progress")

batch_jobs = Table(  # the schema of migrations/versions/0003_batches.py
    "batch_jobs", METADATA,
    Column("id", String(256), primary_key=True),  # batch_<hex>, or accounts/<a>/batchInferenceJobs/<id>
    Column("shape", String(16), nullable=False),  # "openai" | "fireworks"
    Column("account", String(128)),  # a Fireworks job's account
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("status", String(32), nullable=False),  # ACTIVE or ENDED
    Column("model", String(256), nullable=False),
    Column("endpoint", String(64), nullable=False),  # "/v1/chat/completions", ...
    Column("input_path", String(1024), nullable=False),  # under the data directory
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),  # a Fireworks job deleted while it ran: gone once it stops
    Column("times", JSON, nullable=False),  # status -> when it was entered (in_progress_at, ...)
    Column("errors", JSON),  # why it failed: [{"line", "message", "param", "code"}]
    Column("spec", JSON, nullable=False),  # what the client asked, in its shape's words, and the output names
    Index("ix_batch_jobs_created_at_id", "created_at", "id"),
)

batch_results = Table(
    "batch_results", METADATA,
    Column("job_id", String(256), primary_key=True),
    Column("line", Integer, primary_key=True),  # 0-based line of the input file
    Column("custom_id", String(512), nullable=False),
    Column("ok", Boolean, nullable=False),
    Column("result", JSON, nullable=False),  # {"status_code", "request_id", "body"}
)

COUNTERS = ("completed", "failed", "input_tokens", "cached_tokens", "output_tokens")


class BatchStore:
    """Each call is one transaction, run off the event loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, row: dict[str, Any]) -> bool:
        """False when a job of that id exists."""
        defaults = {"total": 0, "deleted": False, "errors": None, "times": {}, **dict.fromkeys(COUNTERS, 0)}
        try:
            with self.engine.begin() as c:
                if c.execute(select(batch_jobs.c.id).where(batch_jobs.c.id == row["id"])).first():
                    return False
                c.execute(batch_jobs.insert().values(**{**defaults, **storable(row)}))
        except IntegrityError:  # another server on the same database made it between the check and the insert
            return False
        return True

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(select(batch_jobs).where(batch_jobs.c.id == job_id)).mappings().first()
        return dict(row) if row else None

    def update(self, job_id: str, *, at: float | None = None, only_from: tuple[str, ...] | None = None,
               **values: Any) -> dict[str, Any] | None:
        """Set fields; with `status` and `at`, also note when that status began (once). The job after it; None
        when there is no such job, or (`only_from`) its status is not one of those (nothing is changed then)."""
        with self.engine.begin() as c:
            row = c.execute(select(batch_jobs).where(batch_jobs.c.id == job_id).with_for_update()).mappings().first()
            if row is None or (only_from is not None and row["status"] not in only_from):
                return None
            if "status" in values and at is not None and values["status"] not in row["times"]:
                values["times"] = {**row["times"], values["status"]: at}
            c.execute(batch_jobs.update().where(batch_jobs.c.id == job_id).values(**values))
            return {**dict(row), **values}

    def list_openai(self, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        with self.engine.connect() as c:
            return page(c, batch_jobs, batch_jobs.c.shape == "openai", (batch_jobs.c.created_at, batch_jobs.c.id),
                        batch_jobs.c.id, limit, after, None, "desc")

    def list_account(self, account: str, offset: int, limit: int, descending: bool) -> tuple[list[dict], int]:
        """A page of an account's Fireworks jobs by creation time, and how many it has in all."""
        t = batch_jobs.c
        where = and_(t.shape == "fireworks", t.account == account, t.deleted.is_(False))
        order = (t.created_at.desc(), t.id.desc()) if descending else (t.created_at.asc(), t.id.asc())
        with self.engine.connect() as c:
            rows = [dict(r) for r in c.execute(select(batch_jobs).where(where).order_by(*order)
                                               .offset(offset).limit(limit)).mappings()]
            total = c.execute(select(func.count()).select_from(batch_jobs).where(where)).scalar_one()
        return rows, total

    def active(self) -> list[dict[str, Any]]:
        """Jobs not yet ended, oldest first: what the runner works through (and resumes after a restart)."""
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(select(batch_jobs).where(batch_jobs.c.status.in_(ACTIVE))
                                               .order_by(batch_jobs.c.created_at, batch_jobs.c.id)).mappings()]

    def add_result(self, job_id: str, line: int, custom_id: str, ok: bool, result: dict[str, Any],
                   usage: dict[str, int]) -> bool:
        """Commit one line's result and add it to the job's counters; False (and nothing changed) when the line
        has a result already."""
        t = batch_jobs.c
        with self.engine.begin() as c:
            if c.execute(select(batch_results.c.line).where(batch_results.c.job_id == job_id,
                                                            batch_results.c.line == line)).first():
                return False
            c.execute(batch_results.insert().values(job_id=job_id, line=line, custom_id=storable(custom_id), ok=ok,
                                                    result=storable(result)))
            counts = {"completed": int(ok), "failed": int(not ok), **usage}
            c.execute(batch_jobs.update().where(t.id == job_id)
                      .values({getattr(t, k): getattr(t, k) + counts.get(k, 0) for k in COUNTERS}))
        return True

    def done_lines(self, job_id: str) -> set[int]:
        with self.engine.connect() as c:
            return set(c.execute(select(batch_results.c.line).where(batch_results.c.job_id == job_id)).scalars())

    def results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's results in input order."""
        with self.engine.connect() as c:
            rows = c.execute(select(batch_results).where(batch_results.c.job_id == job_id)
                             .order_by(batch_results.c.line)).mappings()
            for r in rows:
                yield dict(r)

    def delete(self, job_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(batch_results.delete().where(batch_results.c.job_id == job_id))
            c.execute(batch_jobs.delete().where(batch_jobs.c.id == job_id))
