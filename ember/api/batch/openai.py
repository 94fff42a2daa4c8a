"""OpenAI's shape of a batch job: the Batch object and the output and error files (`{id, custom_id, response:
{status_code, request_id, body}, error}` per line), which become files of purpose `batch_output`."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from ember.api.batch.outcome import output_line
from ember.store import Store

# the job's life in OpenAI's words (a job waiting behind another is already in_progress for OpenAI)
STATUS = {"validating": "validating", "pending": "in_progress", "in_progress": "in_progress",
          "finalizing": "finalizing", "completed": "completed", "failed": "failed", "cancelling": "cancelling",
          "cancelled": "cancelled", "expired": "expired"}
TIMES = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


def _when(job: dict[str, Any], status: str) -> int | None:
    at = job["times"].get(status) or (job["times"].get("pending") if status == "in_progress" else None)
    return int(at) if at is not None else None


def batch_object(job: dict[str, Any]) -> dict[str, Any]:
    spec = job["spec"]
    errors = {"object": "list", "data": job["errors"]} if job["errors"] else None
    return {
        "id": job["id"], "object": "batch", "endpoint": job["endpoint"], "model": job["model"] or None,
        "errors": errors, "input_file_id": spec["input_file_id"], "completion_window": spec["completion_window"],
        "status": STATUS[job["status"]], "output_file_id": spec.get("output_file_id"),
        "error_file_id": spec.get("error_file_id"), "created_at": int(job["created_at"]),
        "expires_at": int(job["expires_at"]), **{f"{s}_at": _when(job, s) for s in TIMES},
        "request_counts": {"total": job["total"], "completed": job["completed"], "failed": job["failed"]},
        "usage": {"input_tokens": job["input_tokens"],
                  "input_tokens_details": {"cached_tokens": job["cached_tokens"]},
                  "output_tokens": job["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": job["input_tokens"] + job["output_tokens"]},
        "metadata": spec.get("metadata"),
    }


def _line(job_id: str, row: dict[str, Any]) -> bytes:
    line_id = "batch_req_" + hashlib.sha256(f"{job_id}:{row['line']}".encode()).hexdigest()[:24]
    return json.dumps(output_line(line_id, row["custom_id"], row["result"]), ensure_ascii=False).encode() + b"\n"


def write_outputs(store: Store, job: dict[str, Any]) -> dict[str, Any]:
    """The output file (the lines that succeeded, in input order) and, when some failed, the error file; their
    ids were chosen when the job was created, so writing them again after a crash changes nothing."""
    spec, found = job["spec"], {}
    rows = list(store.batches.results(job["id"]))
    for kind, ok in (("output", True), ("error", False)):
        file_id = spec[f"pending_{kind}_file_id"]
        lines = [_line(job["id"], r) for r in rows if r["ok"] == ok]
        if not lines and not ok:
            continue
        relative = f"files/{file_id}"
        size = store.blobs.write_lines(relative, lines)
        expires = spec.get("output_expires_after")
        if store.files.get_file(file_id) is None:
            now = time.time()
            store.files.put_file({"id": file_id, "created_at": now, "purpose": "batch_output",
                                  "filename": f"{job['id']}_{kind}.jsonl", "bytes": size, "path": relative,
                                  "expires_at": now + expires if expires else None})
        found[f"{kind}_file_id"] = file_id
    return found


def write_failed(store: Store, job: dict[str, Any]) -> None:
    """A batch that failed validation has no output files: its `errors` say why."""
