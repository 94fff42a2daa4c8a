"""Files, datasets and batch jobs in the store, on SQLite and on a real PostgreSQL server: a line's result
committed once whatever happens (the key of exactly-once resumption), counters moving with it, status moves a
client made first never overwritten, listings, and deletions that take the contents off the disk."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from ember.store import Store, StoreConfig
from ember.store.batches import CANCELLABLE, batch_jobs, batch_results
from ember.store.files import datasets, files
from tests.test_store import clean_store_config, postgres  # noqa: F401  (postgres: a fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[Store]:
    config: StoreConfig = clean_store_config(request, tmp_path, [batch_results, batch_jobs, datasets, files])
    config.data_dir = str(tmp_path)  # file contents stay in the test's folder whatever the database
    store = Store(config)
    yield store
    store.close()


def _job(job_id: str, created_at: float = 1000.0, **kw: Any) -> dict[str, Any]:
    return {"id": job_id, "shape": "openai", "created_at": created_at, "expires_at": created_at + 86400,
            "status": "validating", "model": "m", "endpoint": "/v1/chat/completions", "input_path": "x",
            "spec": {"input_file_id": "file-1"}, **kw}


def test_a_result_is_committed_once_with_its_counters(store: Store) -> None:
    assert store.batches.create(_job("batch_a"))
    assert not store.batches.create(_job("batch_a"))  # one job per id
    usage = {"input_tokens": 10, "output_tokens": 5, "cached_tokens": 4}
    assert store.batches.add_result("batch_a", 3, "c3", True, {"status_code": 200, "body": {"x": "é"}}, usage)
    assert not store.batches.add_result("batch_a", 3, "c3", True, {"status_code": 200, "body": {}}, usage)
    assert store.batches.add_result("batch_a", 1, "c1", False, {"status_code": 400, "body": {}}, {})
    job = store.batches.get("batch_a")
    assert (job["completed"], job["failed"], job["input_tokens"], job["output_tokens"], job["cached_tokens"]) == \
        (1, 1, 10, 5, 4)
    assert store.batches.done_lines("batch_a") == {1, 3}
    assert [(r["line"], r["custom_id"], r["ok"]) for r in store.batches.results("batch_a")] == \
        [(1, "c1", False), (3, "c3", True)]
    assert next(r for r in store.batches.results("batch_a") if r["ok"])["result"]["body"] == {"x": "é"}


def test_status_moves_note_their_time_once_and_respect_the_client(store: Store) -> None:
    store.batches.create(_job("batch_b", times={"validating": 1000.0}))
    job = store.batches.update("batch_b", status="in_progress", at=1001.0, total=7)
    assert job["times"] == {"validating": 1000.0, "in_progress": 1001.0} and job["total"] == 7
    store.batches.update("batch_b", status="in_progress", at=1005.0)  # resumed: the first start stands
    assert store.batches.get("batch_b")["times"]["in_progress"] == 1001.0
    assert store.batches.update("batch_b", status="cancelling", at=1002.0, only_from=CANCELLABLE) is not None
    # the runner's next move, made after the client cancelled, changes nothing
    assert store.batches.update("batch_b", status="finalizing", at=1003.0, only_from=("in_progress",)) is None
    assert store.batches.get("batch_b")["status"] == "cancelling"
    assert store.batches.update("nope", status="failed") is None


def test_active_jobs_and_listings(store: Store) -> None:
    for i in range(5):
        store.batches.create(_job(f"batch_{i}", created_at=1000.0 + i))
    store.batches.update("batch_1", status="completed")
    store.batches.create(_job("accounts/a/batchInferenceJobs/j", shape="fireworks", account="a"))
    store.batches.create(_job("accounts/b/batchInferenceJobs/j", shape="fireworks", account="b", deleted=True))
    # oldest first, ties by id; the completed one is not there
    assert [j["id"] for j in store.batches.active()] == ["accounts/a/batchInferenceJobs/j",
                                                         "accounts/b/batchInferenceJobs/j", "batch_0", "batch_2",
                                                         "batch_3", "batch_4"]
    rows, more = store.batches.list_openai(2, None)
    assert [r["id"] for r in rows] == ["batch_4", "batch_3"] and more
    rows, more = store.batches.list_openai(10, "batch_3")
    assert [r["id"] for r in rows] == ["batch_2", "batch_1", "batch_0"] and not more
    rows, total = store.batches.list_account("a", 0, 10, False)
    assert [r["id"] for r in rows] == ["accounts/a/batchInferenceJobs/j"] and total == 1
    assert store.batches.list_account("b", 0, 10, False) == ([], 0)  # deleted while running: hidden
    store.batches.add_result("batch_0", 1, "c", True, {}, {})
    store.batches.delete("batch_0")
    assert store.batches.get("batch_0") is None and store.batches.done_lines("batch_0") == set()


def test_files_live_expire_and_leave_the_disk(store: Store) -> None:
    now = time.time()
    for i, expires in enumerate((None, now + 3600, now - 1)):
        size = store.blobs.write_lines(f"files/f{i}", [b'{"a": 1}\n'])
        store.files.put_file({"id": f"file-{i}", "created_at": now + i, "purpose": "batch", "filename": "x.jsonl",
                              "bytes": size, "expires_at": expires, "path": f"files/f{i}"})
    assert store.files.get_file("file-2") is None  # expired: gone at once for readers
    rows, more = store.files.list_files(10, None, "asc", None)
    assert [r["id"] for r in rows] == ["file-0", "file-1"] and not more
    assert store.files.list_files(10, None, "asc", "user_data") == ([], False)
    assert store.files.sweep_expired() == 1 and not store.blobs.path("files/f2").exists()
    assert store.files.delete_file("file-0") and not store.blobs.path("files/f0").exists()
    assert not store.files.delete_file("file-0")


def test_datasets_by_account_pages_and_deletion(store: Store) -> None:
    for i in range(3):
        row = {"account": "a", "id": f"d{i}", "created_at": 1000.0 - i, "updated_at": 1000.0, "state": "UPLOADING",
               "example_count": 0, "files": {}, "meta": {"displayName": f"D{i}"}}
        assert store.files.put_dataset(row)
    assert not store.files.put_dataset({**row, "meta": {}})
    assert store.files.put_dataset({**row, "account": "b"})  # ids are per account
    store.blobs.write_lines("datasets/a/d0/in.jsonl", [b"{}\n"])
    store.files.update_dataset("a", "d0", state="READY", files={"in.jsonl": 3}, example_count=1)
    got = store.files.get_dataset("a", "d0")
    assert (got["state"], got["files"], got["example_count"]) == ("READY", {"in.jsonl": 3}, 1)
    rows, total = store.files.list_datasets("a", 1, 10, False, False)
    assert [r["id"] for r in rows] == ["d1", "d2"] and total == 3
    rows, _ = store.files.list_datasets("a", 0, 2, False, True)  # by creation time: d2 is the oldest
    assert [r["id"] for r in rows] == ["d2", "d1"]
    assert store.files.delete_dataset("a", "d0") and not store.blobs.path("datasets/a/d0").exists()
    assert store.files.get_dataset("a", "d0") is None and not store.files.delete_dataset("a", "d0")


def test_blobs_stay_inside_the_data_directory(store: Store) -> None:
    with pytest.raises(ValueError):
        store.blobs.path("../outside")
