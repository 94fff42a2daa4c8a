"""Fireworks' shape of a batch job: the BatchInferenceJob and Dataset objects, and the output dataset, which
holds `BIJOutputSet.jsonl` (`{custom_id, response}` per line that succeeded) and, when some failed,
`error-data.jsonl` (`{custom_id, error: {code, message}}`)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from ember.serving.errors import RequestError
from ember.store import Store
from ember.store.files import dataset_folder

OUTPUT_FILE, ERROR_FILE = "BIJOutputSet.jsonl", "error-data.jsonl"
EXPECTED = "_expectedFiles"  # a dataset's meta: the files :getUploadEndpoint registered (name -> bytes), not shown
RESOURCE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # Fireworks' resource ids (and safe as folder names)
STATE = {"validating": "JOB_STATE_VALIDATING", "pending": "JOB_STATE_PENDING", "in_progress": "JOB_STATE_RUNNING",
         "finalizing": "JOB_STATE_WRITING_RESULTS", "completed": "JOB_STATE_COMPLETED", "failed": "JOB_STATE_FAILED",
         "cancelling": "JOB_STATE_CANCELLING", "cancelled": "JOB_STATE_CANCELLED", "expired": "JOB_STATE_EXPIRED"}
ENDED_MESSAGE = {"cancelled": "cancelled; the lines done are in the output dataset",
                 "expired": "the job ran past its window; the lines done are in the output dataset"}
STATUS_CODE = {"failed": "INVALID_ARGUMENT", "cancelled": "CANCELLED", "expired": "DEADLINE_EXCEEDED"}


def check_id(value: str, param: str) -> str:
    if not RESOURCE_ID.fullmatch(value):
        raise RequestError(f"{param} {value!r} must be 1 to 63 lowercase letters, digits and hyphens, starting "
                           "with a letter or digit", param)
    return value


def dataset_id(account: str, value: str, param: str) -> str:
    """A dataset named as `accounts/<account>/datasets/<id>` or by its id alone: its id."""
    prefix = f"accounts/{account}/datasets/"
    if value.startswith("accounts/") and not value.startswith(prefix):
        raise RequestError(f"{param} {value!r} is not a dataset of account {account!r}", param)
    return check_id(value.removeprefix(prefix), param)


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dataset_object(row: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in row["meta"].items() if k != EXPECTED}
    return {**meta, "name": f"accounts/{row['account']}/datasets/{row['id']}", "createTime": rfc3339(row["created_at"]),
            "updateTime": rfc3339(row["updated_at"]), "state": row["state"], "exampleCount": str(row["example_count"]),
            "status": {"code": "OK", "message": ""}}


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    spec, total = job["spec"], job["total"]
    processed = job["completed"] + job["failed"]
    errors = job["errors"] or []
    message = errors[0]["message"] if errors else ENDED_MESSAGE.get(job["status"], "")
    return {
        "name": job["id"], "displayName": spec.get("displayName", ""), "createTime": rfc3339(job["created_at"]),
        "updateTime": rfc3339(max([job["created_at"], *job["times"].values()])), "createdBy": "",
        "state": STATE[job["status"]],
        "status": {"code": STATUS_CODE.get(job["status"], "OK"), "message": message},
        "model": job["model"], "inputDatasetId": spec["inputDatasetId"], "outputDatasetId": spec["outputDatasetId"],
        "inferenceParameters": spec.get("inferenceParameters", {}), "precision": "PRECISION_UNSPECIFIED",
        "jobProgress": {"percent": processed * 100 // total if total else 0, "totalInputRequests": total,
                        "totalProcessedRequests": processed, "successfullyProcessedRequests": job["completed"],
                        "failedRequests": job["failed"], "outputRows": job["completed"],
                        "inputTokens": job["input_tokens"], "outputTokens": job["output_tokens"],
                        "cachedInputTokenCount": job["cached_tokens"]},
    }


def _error(result: dict[str, Any]) -> dict[str, Any]:
    error = (result.get("body") or {}).get("error") or {}
    return {"code": result["status_code"], "message": error.get("message", "")}


def write_outputs(store: Store, job: dict[str, Any]) -> dict[str, Any]:
    """The output dataset's files from the committed results, in input order; the dataset becomes READY. A
    dataset deleted meanwhile stays deleted, and one made again under its id is the client's, not the job's."""
    account, output = job["account"], job["spec"]["outputDatasetId"].rsplit("/", 1)[-1]
    dataset = store.files.get_dataset(account, output)
    if dataset is None or dataset["meta"].get("sourceJobName") != job["id"]:
        return {}
    rows = list(store.batches.results(job["id"]))
    folder = dataset_folder(account, output)
    sizes = {OUTPUT_FILE: store.blobs.write_lines(f"{folder}/{OUTPUT_FILE}", [
        json.dumps({"custom_id": r["custom_id"], "response": r["result"]["body"]}, ensure_ascii=False).encode() + b"\n"
        for r in rows if r["ok"]])}
    failed = [r for r in rows if not r["ok"]]
    if failed:
        sizes[ERROR_FILE] = store.blobs.write_lines(f"{folder}/{ERROR_FILE}", [
            json.dumps({"custom_id": r["custom_id"], "error": _error(r["result"])}, ensure_ascii=False).encode()
            + b"\n" for r in failed])
    store.files.update_dataset(account, output, state="READY", files=sizes,
                               example_count=sum(r["ok"] for r in rows))
    return {}


def write_failed(store: Store, job: dict[str, Any]) -> None:
    """A job that failed validation leaves its output dataset READY and empty, not waiting for ever for data."""
    write_outputs(store, job)
