"""OpenAI's files and batches end to end through the official `openai` SDK against real `ember serve` processes:
uploads on disk and in listings, batches on every endpoint replayed to the same answers as live requests, lines
failing at run time, malformed files failing whole with the line named, cancel, kill -9 and resume on the same
data directory, a long job beside live traffic, usage rows and metrics, and a PostgreSQL store."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ember.store import Store, StoreConfig
from tests.server import MODEL, Server, launch
from tests.test_store import postgres  # noqa: F401  (the module's PostgreSQL server, a fixture)

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
UPLOAD_LIMIT = 400_000  # --max-upload-bytes of the shared server: above every input file here
ENDED = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ember-batches") / "data"


@pytest.fixture(scope="module")
def srv(data_dir) -> Iterator[Server]:
    """One server for most tests, its data directory known so that files can be looked for on disk."""
    with launch("--max-upload-bytes", str(UPLOAD_LIMIT), env={"EMBER_DATA_DIR": str(data_dir)},
                log=data_dir.parent / "serve.log") as s:
        yield s


def chat(content: str, max_tokens: int = 8, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **kw}


def jsonl(bodies: list[dict], url: str = CHAT, ids: list[str] | None = None) -> bytes:
    ids = ids or [f"req-{i}" for i in range(len(bodies))]
    return b"".join(json.dumps({"custom_id": c, "method": "POST", "url": url, "body": b}).encode() + b"\n"
                    for c, b in zip(ids, bodies, strict=True))


def submit(client: openai.OpenAI, data: bytes, endpoint: str = CHAT, **kw) -> openai.types.Batch:
    upload = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h", **kw)


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 120.0) -> openai.types.Batch:
    """The batch once it has ended (a failed assert, not a hang, past the timeout)."""
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout} s: {batch}"
        time.sleep(0.1)
    return batch


def lines_of(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def run_batch(client: openai.OpenAI, data: bytes, endpoint: str = CHAT, **kw) -> tuple[openai.types.Batch,
                                                                                      list[dict]]:
    """Submit, wait for `completed`, and the output file's lines."""
    batch = wait(client, submit(client, data, endpoint, **kw).id)
    assert batch.status == "completed", batch
    return batch, lines_of(client, batch.output_file_id)


def by_custom_id(lines: list[dict]) -> dict[str, dict]:
    found = {line["custom_id"]: line for line in lines}
    assert len(found) == len(lines), "a custom_id appears more than once"
    return found


def failure(call, *args, **kw) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call(*args, **kw)
    return caught.value


def on_disk(data: Path, folder: str = "files") -> set[str]:
    """The names in a folder of the data directory (partial uploads included)."""
    return {p.name for p in (data / folder).iterdir()} if (data / folder).exists() else set()


# files

def test_upload_retrieve_content_and_delete_removes_it_from_disk(srv, data_dir):
    client = srv.client()
    data = jsonl([chat("Héllo ✓")])
    created = client.files.create(file=("prompts.jsonl", data), purpose="batch")
    assert (created.object, created.purpose, created.filename, created.bytes) == ("file", "batch", "prompts.jsonl",
                                                                                  len(data))
    assert created.status == "processed" and created.expires_at is None and created.id.startswith("file-")
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data
    path = data_dir / "files" / created.id
    assert path.read_bytes() == data

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    assert not path.exists()
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        gone = failure(call, created.id)
        assert gone.status_code == 404 and gone.code == "not_found", call


def test_file_listing_pages_orders_and_filters_by_purpose(srv):
    client = srv.client()
    ids = [client.files.create(file=(f"u{i}.txt", b"x" * (i + 1)), purpose="user_data").id for i in range(3)]
    newest_first = ids[::-1]
    first = client.files.list(limit=2, purpose="user_data")
    assert [f.id for f in first.data] == newest_first[:2] and first.has_more
    rest = client.files.list(limit=2, purpose="user_data", after=first.data[-1].id)
    assert [f.id for f in rest.data] == newest_first[2:] and not rest.has_more
    assert [f.id for f in client.files.list(limit=1, purpose="user_data")] == newest_first  # the SDK pages on
    assert [f.id for f in client.files.list(purpose="user_data", order="asc")] == ids
    assert [f.id for f in client.files.list(purpose="user_data", order="asc", after=ids[0])] == ids[1:]
    batch_files = {f.id for f in client.files.list(purpose="batch")}
    assert not batch_files & set(ids)
    assert set(ids) <= {f.id for f in client.files.list()}
    unknown = failure(client.files.list, after="file-nope")
    assert unknown.status_code == 400 and unknown.param == "after"


def test_upload_errors_leave_nothing_on_disk(srv, data_dir):
    client = srv.client()
    before = on_disk(data_dir)
    purpose = failure(client.files.create, file=("a.jsonl", b"{}"), purpose="homework")
    assert purpose.status_code == 400 and purpose.param == "purpose" and "purpose" in purpose.message
    no_file = httpx.post(f"{srv.url}/v1/files", files={"purpose": (None, "batch")}, timeout=30)  # multipart
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file", no_file.text
    too_large = failure(client.files.create, file=("big.jsonl", b"x" * (UPLOAD_LIMIT + 1)), purpose="batch")
    assert too_large.status_code == 413 and "max-upload-bytes" in too_large.message

    def chunked() -> Iterator[bytes]:  # no content-length: the server must count as the body arrives
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(UPLOAD_LIMIT // 50_000 + 1):
            yield b"y" * 50_000
        yield b"\r\n--b--\r\n"

    streamed = httpx.post(f"{srv.url}/v1/files", content=chunked(), timeout=30,
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413, streamed.text
    assert on_disk(data_dir) == before
    assert not any(f.filename == "big.jsonl" for f in client.files.list())


def test_a_file_whose_contents_went_missing_is_a_404_not_a_500(srv, data_dir):
    """What a DELETE racing a download or a batch create leaves: the row read, then the contents gone."""
    client = srv.client()
    created = client.files.create(file=("in.jsonl", jsonl([chat("Hi", 2)])), purpose="batch")
    (data_dir / "files" / created.id).unlink()
    assert failure(client.files.content, created.id).status_code == 404
    before = {b.id for b in client.batches.list(limit=100)}
    error = failure(client.batches.create, input_file_id=created.id, endpoint=CHAT, completion_window="24h")
    assert (error.status_code, error.param) == (404, "input_file_id"), error.body
    assert {b.id for b in client.batches.list(limit=100)} == before
    assert not on_disk(data_dir, "batches") - before  # no folder left for a job never made


def test_expires_after_is_reported_as_expires_at(srv):
    client = srv.client()
    created = client.files.create(file=("e.jsonl", b"{}\n"), purpose="batch",
                                  expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600
    assert client.files.retrieve(created.id).expires_at == created.expires_at
    short = failure(client.files.create, file=("e.jsonl", b"{}\n"), purpose="batch",
                    expires_after={"anchor": "created_at", "seconds": 60})
    assert short.status_code == 400 and short.param == "expires_after.seconds"


# batches

def test_chat_batch_end_to_end_matches_live_answers(srv):
    client = srv.client()
    prompts = ["Name a colour.", "What is 2+2?", "Say hello.", "Write a haiku about rain.", "Capital of France?",
               "List three fruits."]
    bodies = [chat(p, max_tokens=12, temperature=0) for p in prompts]
    submitted = submit(client, jsonl(bodies), metadata={"run": "e2e"},
                       output_expires_after={"anchor": "created_at", "seconds": 7200})
    assert submitted.status in ("validating", "in_progress") and submitted.output_file_id is None
    batch = wait(client, submitted.id)
    assert batch.status == "completed", batch
    assert (batch.endpoint, batch.model, batch.input_file_id, batch.completion_window) == (
        CHAT, MODEL, submitted.input_file_id, "24h")
    assert batch.metadata == {"run": "e2e"} and batch.errors is None and batch.error_file_id is None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 6, 0)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.failed_at is batch.cancelled_at is batch.cancelling_at is batch.expired_at is None
    assert batch.expires_at == batch.created_at + 86400

    output = client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output" and output.bytes == len(client.files.content(output.id).content)
    assert output.expires_at == output.created_at + 7200
    lines = lines_of(client, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(6)]  # once each, in input order
    assert len({line["id"] for line in lines}) == 6 and all(line["id"].startswith("batch_req_") for line in lines)
    for line, body in zip(lines, bodies, strict=True):
        response = line["response"]
        assert line["error"] is None and response["status_code"] == 200
        assert response["request_id"] == response["body"]["id"]
        answer = openai.types.chat.ChatCompletion.model_validate(response["body"])
        assert answer.model == MODEL and answer.usage.completion_tokens <= 12
        live = client.chat.completions.create(**body)
        assert answer.choices[0].message.content == live.choices[0].message.content, line["custom_id"]
    usage = [line["response"]["body"]["usage"] for line in lines]
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usage)
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usage)
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens


def test_completions_and_responses_endpoints_in_a_batch(srv):
    client = srv.client()
    prompts = ["Once upon a time", "The capital of Italy is"]
    completions = [{"model": MODEL, "prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts]
    batch, lines = run_batch(client, jsonl(completions, COMPLETIONS), COMPLETIONS)
    assert batch.endpoint == COMPLETIONS and batch.request_counts.completed == 2
    for line, body in zip(lines, completions, strict=True):
        answer = openai.types.Completion.model_validate(line["response"]["body"])
        assert answer.object == "text_completion"
        assert answer.choices[0].text == client.completions.create(**body).choices[0].text

    responses = [{"model": MODEL, "input": p, "max_output_tokens": 8, "temperature": 0} for p in prompts]
    batch, lines = run_batch(client, jsonl(responses, RESPONSES), RESPONSES)
    assert batch.endpoint == RESPONSES and batch.request_counts.completed == 2
    for line, body in zip(lines, responses, strict=True):
        answer = openai.types.responses.Response.model_validate(line["response"]["body"])
        assert answer.object == "response" and answer.usage.output_tokens <= 8
        assert answer.output_text and answer.output_text == client.responses.create(**body).output_text


def test_n_choices_and_structured_output_in_a_batch(srv):
    client = srv.client()
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    bodies = [chat("Hi", max_tokens=6, n=3, temperature=1.0, seed=7),
              chat("Is the sky blue? Answer in JSON.", max_tokens=32, temperature=0,
                   response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema,
                                                                           "strict": True}})]
    batch, lines = run_batch(client, jsonl(bodies, ids=["many", "json"]))
    found = by_custom_id(lines)
    many = openai.types.chat.ChatCompletion.model_validate(found["many"]["response"]["body"])
    assert [c.index for c in many.choices] == [0, 1, 2] and all(c.message.content for c in many.choices)
    assert 3 <= many.usage.completion_tokens <= 3 * 6  # the three samples' tokens, in one usage
    verdict = json.loads(found["json"]["response"]["body"]["choices"][0]["message"]["content"])
    assert set(verdict) == {"answer", "sure"} and verdict["answer"] in ("yes", "no")
    assert isinstance(verdict["sure"], bool)


def _metric(srv: Server, outcome: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    found = re.search(rf'^ember_batch_requests_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_line_failing_at_run_time_goes_to_the_error_file(srv):
    """The file is valid (the body passes the endpoint's schema) but the request is refused when it runs."""
    client = srv.client()
    before = _metric(srv, "failed")
    too_long = chat("Hi", max_tokens=100_000, context_length_exceeded_behavior="error")
    batch = wait(client, submit(client, jsonl([chat("Hi", 4), too_long, chat("Yo", 4)])).id)
    assert _metric(srv, "failed") - before == 1
    assert batch.status == "completed" and batch.errors is None, batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 2, 1)
    assert [line["custom_id"] for line in lines_of(client, batch.output_file_id)] == ["req-0", "req-2"]
    assert batch.error_file_id is not None
    assert client.files.retrieve(batch.error_file_id).purpose == "batch_output"
    [failed] = lines_of(client, batch.error_file_id)
    assert failed["custom_id"] == "req-1" and failed["response"]["status_code"] == 400
    error = failed["response"]["body"]["error"]
    assert (error["code"], error["param"], error["type"]) == ("context_length_exceeded", "max_tokens",
                                                              "invalid_request_error")
    assert "context window" in error["message"]


def test_malformed_files_fail_the_whole_batch_naming_the_line(srv):
    client = srv.client()
    good = {"custom_id": "ok", "method": "POST", "url": CHAT, "body": chat("Hi", 4)}

    def line(**changes) -> bytes:
        return json.dumps({**good, **changes}).encode()

    files = {  # what is wrong: (the file, the line, the param, the code)
        "bad json": (b"\n".join([line(custom_id=f"g{i}") for i in range(6)] + [b'{"custom_id": "z", ']), 7, None,
                     "invalid_json"),
        "duplicate custom_id": (b"\n".join([line(custom_id="a"), line(custom_id="b"), line(custom_id="a")]), 3,
                                "custom_id", "duplicate_custom_id"),
        "unknown line field": (b"\n".join([line(), line(custom_id="x", priority=1)]), 2, "priority",
                               "unknown_field"),
        "unknown body field": (b"\n".join([line(), line(custom_id="x", body={**good["body"], "frobnicate": 1})]), 2,
                               "body.frobnicate", "unknown_field"),
        "another url": (b"\n".join([line(), line(custom_id="x", url=COMPLETIONS)]), 2, "url", "invalid_line"),
        "unknown model": (b"\n".join([line(), line(custom_id="x", body={**good["body"], "model": "gpt-9"})]), 2,
                          "body.model", "model_not_found"),
    }
    submitted = {what: submit(client, data).id for what, (data, *_) in files.items()}
    for what, (_, number, param, code) in files.items():
        batch = wait(client, submitted[what])
        assert batch.status == "failed" and batch.failed_at is not None, (what, batch)
        assert batch.in_progress_at is None and batch.output_file_id is batch.error_file_id is None, what
        assert batch.request_counts.total == batch.request_counts.completed == 0, what
        [error] = batch.errors.data
        assert (error.line, error.param, error.code) == (number, param, code), (what, error)
        assert error.message.startswith(f"line {number}: "), (what, error)


def test_create_batch_errors_name_the_field(srv):
    client = srv.client()
    upload = client.files.create(file=("in.jsonl", jsonl([chat("Hi", 2)])), purpose="batch")
    other = client.files.create(file=("in.jsonl", jsonl([chat("Hi", 2)])), purpose="evals")
    ok = {"input_file_id": upload.id, "endpoint": CHAT, "completion_window": "24h"}
    cases = [({"input_file_id": "file-missing"}, 404, "input_file_id", "No file"),
             ({"input_file_id": other.id}, 400, "input_file_id", "purpose"),
             ({"endpoint": "/v1/moderations"}, 400, "endpoint", "not supported"),
             ({"endpoint": "/v1/chat"}, 400, "endpoint", "endpoint must be one of"),
             ({"completion_window": "48h"}, 400, "completion_window", "24h"),
             ({"extra_body": {"frobnicate": 1}}, 400, "frobnicate", "frobnicate")]
    before = {b.id for b in client.batches.list(limit=100)}
    for change, status, param, words in cases:
        error = failure(client.batches.create, **{**ok, **change})
        assert (error.status_code, error.param) == (status, param), (change, error.body)
        assert words in error.message, (change, error.message)
    assert {b.id for b in client.batches.list(limit=100)} == before  # none was created
    assert failure(client.batches.retrieve, "batch_missing").status_code == 404
    assert failure(client.batches.cancel, "batch_missing").status_code == 404


def test_cancel_mid_job_keeps_the_lines_done_and_frees_the_engine(srv):
    client = srv.client()
    bodies = [chat(f"Tell me a story about the number {i}.", max_tokens=32, ignore_eos=True) for i in range(200)]
    batch = submit(client, jsonl(bodies))
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch.id)).request_counts.completed == 0:
        assert batch.status not in ENDED and time.monotonic() < deadline, batch
        time.sleep(0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None, cancelling
    batch = wait(client, batch.id, timeout=30)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at, batch
    assert batch.completed_at is None and batch.failed_at is None
    done = batch.request_counts.completed
    assert 0 < done < batch.request_counts.total == 200 and batch.request_counts.failed == 0
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling an ended batch changes nothing
    stats = srv.wait_idle()
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0, stats
    assert client.batches.retrieve(batch.id).request_counts.completed == done  # nothing ran after the cancel
    lines = lines_of(client, batch.output_file_id)
    assert len(by_custom_id(lines)) == done
    for line in lines:
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["usage"]["completion_tokens"] == 32
    assert batch.usage.output_tokens == 32 * done


def test_a_job_past_its_window_expires_with_the_lines_done(srv):
    """Ember's short windows ("2s"; OpenAI has only "24h"): the job stops where it is, as a cancel does."""
    client = srv.client()
    upload = client.files.create(file=("in.jsonl", jsonl([chat(f"Story {i}.", 32, ignore_eos=True)
                                                          for i in range(300)])), purpose="batch")
    batch = wait(client, client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="2s").id)
    assert batch.status == "expired" and batch.expires_at == batch.created_at + 2, batch
    assert batch.expired_at >= batch.expires_at and batch.completed_at is None
    assert batch.request_counts.completed < batch.request_counts.total == 300
    assert len(by_custom_id(lines_of(client, batch.output_file_id))) == batch.request_counts.completed
    assert srv.wait_idle()["kv_blocks_used"] == 0


def test_batch_listing_pages_newest_first(srv):
    client = srv.client()
    ids = [submit(client, jsonl([chat(f"Hi {i}", 1)])).id for i in range(3)]
    for batch_id in ids:
        assert wait(client, batch_id).status == "completed"
    newest_first = ids[::-1]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2] and first.has_more
    after = client.batches.list(limit=2, after=ids[1])
    assert after.data[0].id == ids[0]
    everything = [b.id for b in client.batches.list(limit=2)]  # the SDK follows `after` page by page
    assert len(everything) == len(set(everything)) and everything[:3] == newest_first
    assert everything == [b.id for b in client.batches.list(limit=100).data]
    assert failure(client.batches.list, after="batch_missing").param == "after"


def _ttft(client: openai.OpenAI, i: int) -> float:
    """Seconds to the first streamed content of a live chat request (the rest is read, and must be there)."""
    start = time.perf_counter()
    first, text = None, ""
    for chunk in client.chat.completions.create(**chat(f"Say something about {i}.", 8), stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text += chunk.choices[0].delta.content
    assert first is not None and text
    return first


def test_a_thousand_line_job_beside_live_traffic(srv):
    client = srv.client()
    idle = [_ttft(client, i) for i in range(8)]
    bodies = [chat(f"Number {i}?", max_tokens=4) for i in range(1000)]
    batch = submit(client, jsonl(bodies))
    during = []
    deadline = time.monotonic() + 150
    while (batch := client.batches.retrieve(batch.id)).status not in ENDED:
        assert time.monotonic() < deadline, batch
        if batch.request_counts.completed > 0:
            during.append(_ttft(client, len(during)))  # raises on any failed live request
        else:
            time.sleep(0.05)
    print(f"\nlive TTFT p50: idle {statistics.median(idle) * 1000:.1f} ms, beside the 1,000-line job "
          f"{statistics.median(during) * 1000:.1f} ms ({len(during)} requests)")
    assert len(during) >= 3  # live requests did run while the job did
    assert batch.status == "completed" and batch.request_counts.completed == 1000, batch
    assert len(by_custom_id(lines_of(client, batch.output_file_id))) == 1000


def test_usage_rows_name_the_batch_and_metrics_count_its_lines(srv, data_dir):
    client = srv.client()
    before = _metric(srv, "completed")
    batch, lines = run_batch(client, jsonl([chat(f"Hi {i}", 2) for i in range(3)]))
    assert _metric(srv, "completed") - before == 3
    request_ids = {line["response"]["request_id"].removeprefix("chatcmpl-") for line in lines}
    deadline = time.monotonic() + 10
    while True:  # the store's writer flushes in the background
        with sqlite3.connect(f"file:{data_dir / 'ember.db'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT endpoint, status, request_id, completion_tokens FROM usage_records "
                              "WHERE batch_id = ?", (batch.id,)).fetchall()
            live = db.execute("SELECT count(*) FROM usage_records WHERE batch_id IS NULL").fetchone()[0]
        if len(rows) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(rows) == sorted(("chat.completions", 200, rid, 2) for rid in request_ids)
    assert live > 0  # the client's own requests (the upload, the polls) carry no batch id


# restarts and other stores

def test_kill_9_mid_job_then_restart_completes_each_line_once(tmp_path):
    data = tmp_path / "data"
    bodies = [chat(f"Write about {i}.", max_tokens=4, ignore_eos=True) for i in range(300)]
    with launch(env={"EMBER_DATA_DIR": str(data)}, log=tmp_path / "first.log") as s:
        client = s.client()
        batch = submit(client, jsonl(bodies))
        deadline = time.monotonic() + 60
        while (batch := client.batches.retrieve(batch.id)).request_counts.completed < 30:
            assert batch.status not in ENDED and time.monotonic() < deadline, batch
            time.sleep(0.05)
        os.kill(s.pid, signal.SIGKILL)
    assert batch.request_counts.completed < 300
    with launch(env={"EMBER_DATA_DIR": str(data)}, log=tmp_path / "restarted.log") as s:
        client = s.client()
        batch = wait(client, batch.id)
        assert batch.status == "completed", batch
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (300, 300,
                                                                                                             0)
        lines = lines_of(client, batch.output_file_id)
    found = by_custom_id(lines)
    assert sorted(found) == sorted(f"req-{i}" for i in range(300))
    for line in lines:
        answer = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        assert line["response"]["status_code"] == 200 and answer.object == "chat.completion"
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 4
    assert batch.usage.output_tokens == 4 * 300  # the lines rerun after the kill counted once


def test_a_batch_on_a_postgresql_store(tmp_path, postgres):  # noqa: F811
    env = {"EMBER_DATABASE_URL": postgres.url, "EMBER_DATA_DIR": str(tmp_path / "data")}
    with launch(env=env, log=tmp_path / "serve.log") as s:
        client = s.client()
        batch, lines = run_batch(client, jsonl([chat(f"Hi {i}", 3, temperature=0) for i in range(3)]))
        assert [line["custom_id"] for line in lines] == ["req-0", "req-1", "req-2"]
        assert client.batches.list().data[0].id == batch.id
    store = Store(StoreConfig(database_url=postgres.url))  # what the server wrote is in PostgreSQL
    try:
        assert store.batches.get(batch.id)["status"] == "completed"
        assert len(list(store.batches.results(batch.id))) == 3
        assert store.files.get_file(batch.output_file_id)["purpose"] == "batch_output"
    finally:
        store.close()
