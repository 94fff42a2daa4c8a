"""The job runner: one asyncio task per server working through the store's unfinished jobs, oldest first, one
job's lines at a time. Each line is replayed through the live endpoint in-process (ember.api.batch.inprocess)
with `service_tier: flex`, so the engine schedules it behind live requests; the runner keeps at most
`--batch-concurrency` lines in flight and one fewer for every live request the model is serving.

Every result is committed as it completes (ember.store.batches), and only then counts as done: a job found
unfinished at start-up (kill -9, a power cut) resumes with the lines that have no result, so each line is in
the output exactly once. Cancel, delete, expiry and shutdown abort the lines in flight (their KV blocks are
freed at once); what they leave uncommitted is rerun only by a resumed job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from ember.api.batch import fireworks, openai
from ember.api.batch.inprocess import call
from ember.api.batch.lines import InvalidFile, Line, read_lines
from ember.api.batch.outcome import RETRY_PAUSE_S, RETRY_STATUSES, usage_of
from ember.serving.models import ModelRegistry
from ember.store import Store

log = logging.getLogger("ember.batch")

SWEEP_S = 60.0  # how often expired files are removed when no job wakes the runner
SHAPES = {"openai": openai, "fireworks": fireworks}
# the statuses the runner moves a job to, from the ones it may be in ("cancelling" is the client's, and ends only
# as "cancelled")
SOURCES = {"pending": ("validating",), "failed": ("validating", "in_progress"),
           "in_progress": ("pending", "in_progress"), "finalizing": ("in_progress",), "completed": ("finalizing",),
           "cancelled": ("validating", "pending", "in_progress", "cancelling"), "expired": ("pending", "in_progress")}


def keep_input(store: Store, sources: list[str], job_id: str) -> str:
    """The job's own copy of its input (a hard link where the file system allows; several files, a dataset's
    shards, are joined in order): deleting the uploaded file or dataset while the job runs or waits changes
    nothing. Its path under the data directory."""
    relative = f"batches/{job_id.replace('/', '_')}/input.jsonl"
    target = store.blobs.path(relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    if len(sources) == 1:
        try:
            os.link(store.blobs.path(sources[0]), target)
        except OSError:
            shutil.copyfile(store.blobs.path(sources[0]), target)
        return relative
    with open(target, "wb") as joined:
        for source in sources:
            data = store.blobs.path(source).read_bytes()
            joined.write(data if data.endswith(b"\n") else data + b"\n")
    return relative


class JobRunner:
    def __init__(self, app: FastAPI, store: Store, registry: ModelRegistry, concurrency: int, max_lines: int) -> None:
        self.app, self.store, self.registry = app, store, registry
        self.concurrency, self.max_lines = concurrency, max_lines
        self.in_flight = 0  # lines of the running job being generated now
        self._stop_requested: set[str] = set()  # jobs cancelled or deleted while they may be running
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ember-batch-runner")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """A job was created or told to stop: look at the store again now."""
        self._wake.set()

    def stop_job(self, job_id: str) -> None:
        """Cancel (or delete) a job: no new line starts, the lines in flight are aborted."""
        self._stop_requested.add(job_id)
        self.wake()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            ran = False
            try:
                await self._housekeep(None)
                ran = await self._run_next()
            except Exception:  # a bug or a database outage: log it and try again later, never die
                log.exception("batch runner pass failed")
                await asyncio.sleep(1.0)
            if not ran:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), SWEEP_S)

    async def _housekeep(self, running: str | None) -> None:
        """Everything but running a job, for the jobs other than `running`: validate new ones (so they show
        `pending` or `failed` at once), end the cancelled ones and those past their window, sweep expired
        files. Run between jobs and, while a job runs, whenever the runner is woken."""
        await asyncio.to_thread(self.store.files.sweep_expired)
        for job in await asyncio.to_thread(self.store.batches.active):
            if job["id"] == running:
                continue
            if job["status"] == "validating":
                await self._validate(job)
            elif job["status"] == "cancelling" or job["id"] in self._stop_requested:
                await self._finish(job, "cancelled")
            elif job["status"] == "pending" and time.time() >= job["expires_at"]:
                await self._finish(job, "expired")

    async def _run_next(self) -> bool:
        """Run the oldest job that has lines to run or outputs to write, to its end; False when there is none
        (or the server is shutting down)."""
        if getattr(self.app.state, "draining", False):
            return False
        for job in await asyncio.to_thread(self.store.batches.active):
            if job["status"] in ("pending", "in_progress", "finalizing"):
                await self._advance(job)
                return True
        return False

    def _lines(self, job: dict[str, Any]) -> list[Line]:
        path = self.store.blobs.path(job["input_path"])
        if not path.exists():
            raise InvalidFile("the job's input file is missing from the data directory", code="missing_input")
        shape = job["shape"]
        return read_lines(Path(path).read_bytes(), shape, job["endpoint"], self.registry,
                          job["model"] if shape == "fireworks" else None, job["spec"].get("defaults"),
                          self.max_lines)

    async def _validate(self, job: dict[str, Any]) -> None:
        try:
            lines = await asyncio.to_thread(self._lines, job)
        except InvalidFile as exc:
            await self._fail(job, exc)
            log.info("batch job failed validation", extra={"job": job["id"], "error": str(exc)})
            return
        await self._update(job, "pending", total=len(lines), model=lines[0].body["model"])

    async def _fail(self, job: dict[str, Any], exc: InvalidFile) -> None:
        """The job cannot run: it ends `failed` with the reason, and its outputs say so in its shape's way."""
        error = {"line": exc.line, "message": str(exc), "param": exc.param, "code": exc.code}
        failed = await self._update(job, "failed", errors=[error])
        if failed is not None:
            await asyncio.to_thread(SHAPES[job["shape"]].write_failed, self.store, failed)

    async def _update(self, job: dict[str, Any], status: str, **values: Any) -> dict[str, Any] | None:
        """Move the job on, unless a client moved it first (a cancel between two of the runner's steps): None."""
        return await asyncio.to_thread(self.store.batches.update, job["id"], status=status, at=time.time(),
                                       only_from=SOURCES[status], **values)

    def _stop_reason(self, job: dict[str, Any]) -> str | None:
        if job["id"] in self._stop_requested:
            return "cancelled"
        if time.time() >= job["expires_at"]:
            return "expired"
        if getattr(self.app.state, "draining", False):
            return "shutdown"
        return None

    async def _advance(self, job: dict[str, Any]) -> None:
        status = job["status"]
        if status in ("pending", "in_progress") and job["id"] not in self._stop_requested:
            status = await self._run(job)
        if status == "shutdown":
            return
        final = {"cancelling": "cancelled", "finalizing": "completed", "in_progress": "cancelled",
                 "pending": "cancelled"}.get(status, status)
        if final in ("completed", "cancelled", "expired"):
            await self._finish(job, final)

    def _allowed(self, model_name: str) -> int:
        """Lines the job may have in flight now: its concurrency, one less per live request (those the model
        has admitted that are not this job's), and at least one so that a busy server still makes progress."""
        model = self.registry.find(model_name)
        live = max(0, model.admission.active - self.in_flight)
        return max(1, min(self.concurrency, model.max_num_seqs) - live)

    async def _run(self, job: dict[str, Any]) -> str:
        """Run the lines without a result; what the job should become: "finalizing" when every line has one,
        else why it stopped ("cancelled", "expired", "shutdown")."""
        job = await self._update(job, "in_progress") or job
        try:
            lines = await asyncio.to_thread(self._lines, job)
        except InvalidFile as exc:  # the file changed on disk after validation
            await self._fail(job, exc)
            return "failed"
        done = await asyncio.to_thread(self.store.batches.done_lines, job["id"])
        todo = deque(line for line in lines if line.number not in done)
        disconnected = asyncio.Event()
        running: dict[asyncio.Task, Line] = {}
        reason: str | None = None
        chores: asyncio.Task | None = None  # housekeeping for the other jobs, beside this one's lines
        try:
            while todo or running:
                if self._wake.is_set() and (chores is None or chores.done()):
                    self._wake.clear()
                    chores = asyncio.create_task(self._housekeep(job["id"]))
                reason = reason or self._stop_reason(job)
                if reason is not None:
                    disconnected.set()
                while todo and reason is None and len(running) < self._allowed(job["model"]):
                    line = todo.popleft()
                    running[asyncio.create_task(self._line(job, line, disconnected))] = line
                self._set_in_flight(len(running))
                if not running:
                    break
                finished, _ = await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    line = running.pop(task)
                    if task.result():
                        todo.appendleft(line)
        finally:
            disconnected.set()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, *([chores] if chores else []), return_exceptions=True)
            self._set_in_flight(0)
        return reason or "finalizing"

    async def _line(self, job: dict[str, Any], line: Line, disconnected: asyncio.Event) -> bool:
        """Run one line and commit its result; True when it must run again (the server was busy, or the
        line was aborted)."""
        body = {**line.body, "service_tier": "flex"}
        status, answer, request_id = await call(self.app, job["endpoint"], body, job["id"], disconnected)
        request_id = request_id or f"req_{uuid.uuid4().hex}"  # (error answers carry no x-request-id)
        if status == 499 or disconnected.is_set():
            return True
        if status in RETRY_STATUSES:
            await asyncio.sleep(RETRY_PAUSE_S)
            return True
        ok = status == 200
        result = {"status_code": status, "request_id": request_id, "body": answer}
        await asyncio.to_thread(self.store.batches.add_result, job["id"], line.number, line.custom_id, ok, result,
                                usage_of(answer) if ok else {})
        if self._metrics is not None:
            self._metrics.batch_lines.labels("completed" if ok else "failed").inc()
        return False

    @property
    def _metrics(self) -> Any:
        return getattr(self.app.state, "metrics", None)

    def _set_in_flight(self, count: int) -> None:
        self.in_flight = count
        if self._metrics is not None:
            self._metrics.batch_in_flight.set(count)

    async def _finish(self, job: dict[str, Any], final: str) -> None:
        """Write the job's outputs from its committed results, then give it its final status (the outputs are
        written again, the same, if a crash comes between)."""
        if final == "completed":
            job = await self._update(job, "finalizing") or job
        outputs = await asyncio.to_thread(SHAPES[job["shape"]].write_outputs, self.store, job)
        job = await self._update(job, final, spec={**job["spec"], **outputs}) or job
        self._stop_requested.discard(job["id"])
        if job["deleted"]:
            await asyncio.to_thread(self.store.batches.delete, job["id"])
        log.info("batch job ended", extra={"job": job["id"], "status": final, "completed": job["completed"],
                                           "failed": job["failed"]})
