"""Fireworks' datasets and batch inference jobs end to end through the fireworks-ai SDK against real `ember serve`
processes: a dataset's life on the API and on disk, signed download URLs (keyless, unforgeable), a job's progress
and its output dataset (one answer per line, each what the same request gets live), run-time failures in
error-data.jsonl, malformed inputs failing the job with the line named, deleting a running job, and listings."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import fireworks
import httpx
import pytest
from fireworks import Fireworks

from tests.server import MODEL, Server, launch

ACCOUNT = "acme"
FW_MODEL = f"accounts/fireworks/models/{MODEL}"
MAX_UPLOAD = 64 * 1024
API_KEY = "batch-key"
ENDED = ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")
OUTPUT, ERRORS = "BIJOutputSet.jsonl", "error-data.jsonl"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ember-bij") / "data"


@pytest.fixture(scope="module")
def served(data_dir) -> Server:
    """A server whose data directory the tests look into, with a small upload limit."""
    with launch("--max-upload-bytes", str(MAX_UPLOAD), env={"EMBER_DATA_DIR": str(data_dir)},
                log=data_dir.parent / "serve.log") as s:
        yield s


@pytest.fixture(scope="module")
def fw(served) -> Fireworks:
    return Fireworks(base_url=served.url, api_key="unused", account_id=ACCOUNT, max_retries=0)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("ember-bij-keyed")
    with launch("--api-key", API_KEY, log=folder / "serve.log") as s:
        yield s


def _jsonl(records: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def _line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "body": {"messages": [{"role": "user", "content": content}], **body}}


def _dataset(fw: Fireworks, dataset_id: str, data: bytes, account: str = ACCOUNT, filename: str = "input.jsonl"):
    fw.datasets.create(dataset_id=dataset_id, dataset={"userUploaded": {}}, account_id=account)
    fw.datasets.upload(dataset_id, file=(filename, data), account_id=account)
    return fw.datasets.get(dataset_id, account_id=account)


def _error(exc: pytest.ExceptionInfo) -> dict:
    return exc.value.body["error"]


def _wait_job(fw: Fireworks, job_id: str, account: str = ACCOUNT, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        job = fw.batch_inference_jobs.get(job_id, account_id=account)
        if job.state in ENDED:
            return job
        assert time.monotonic() < deadline, f"job still {job.state}: {job.job_progress}"
        time.sleep(0.1)


def _files(fw: Fireworks, dataset_id: str) -> dict[str, bytes]:
    """The dataset's files, fetched (without the API key) from the URLs getDownloadEndpoint signs."""
    urls = fw.datasets.get_download_endpoint(dataset_id).filename_to_signed_urls
    out = {}
    for name, url in urls.items():
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200, r.text
        out[name] = r.content
    return out


def _records(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


# datasets


def test_dataset_lifecycle_on_the_api_and_on_disk(fw, data_dir):
    created = fw.datasets.create(dataset_id="lifecycle", dataset={"userUploaded": {}, "exampleCount": "4",
                                                                  "displayName": "first"})
    assert created.name == f"accounts/{ACCOUNT}/datasets/lifecycle" and created.state == "UPLOADING"
    assert created.display_name == "first" and created.user_uploaded == {}
    data = _jsonl([_line(f"r{i}", f"Say {i}.") for i in range(4)]) + b"\n"  # a blank last line is no example
    uploaded = fw.datasets.upload("lifecycle", file=("requests.jsonl", data))
    assert uploaded.bytes == len(data) and uploaded.filename == "requests.jsonl"
    got = fw.datasets.get("lifecycle")
    assert got.state == "READY" and got.example_count == "4" and got.update_time >= created.update_time
    folder = data_dir / "datasets" / ACCOUNT / "lifecycle"
    assert (folder / "requests.jsonl").read_bytes() == data

    with pytest.raises(fireworks.BadRequestError) as again:
        fw.datasets.upload("lifecycle", file=("more.jsonl", data))
    assert _error(again)["code"] == "FAILED_PRECONDITION"
    assert sorted(p.name for p in folder.iterdir()) == ["requests.jsonl"]

    updated = fw.datasets.update("lifecycle", display_name="renamed")
    assert updated.display_name == fw.datasets.get("lifecycle").display_name == "renamed"
    assert updated.example_count == "4" and updated.state == "READY"

    assert fw.datasets.delete("lifecycle") is not None
    with pytest.raises(fireworks.NotFoundError):
        fw.datasets.get("lifecycle")
    assert not folder.exists()
    with pytest.raises(fireworks.NotFoundError):
        fw.datasets.delete("lifecycle")


def test_dataset_ids_must_be_unique_and_well_formed(fw):
    fw.datasets.create(dataset_id="dup", dataset={"userUploaded": {}})
    with pytest.raises(fireworks.ConflictError):
        fw.datasets.create(dataset_id="dup", dataset={"userUploaded": {}})
    for bad in ("Upper", "a" * 64, "-lead", "under_score"):
        with pytest.raises(fireworks.BadRequestError) as exc:
            fw.datasets.create(dataset_id=bad, dataset={"userUploaded": {}})
        assert _error(exc)["param"] == "datasetId", bad
    assert fw.datasets.create(dataset_id="a" * 63, dataset={"userUploaded": {}}).state == "UPLOADING"
    with pytest.raises(fireworks.BadRequestError) as exc:  # a path id is checked too
        fw.datasets.get("Upper")
    assert _error(exc)["param"] == "dataset_id"


def test_upload_limits_and_file_names(fw, data_dir):
    fw.datasets.create(dataset_id="big", dataset={"userUploaded": {}})
    with pytest.raises(fireworks.APIStatusError) as exc:
        fw.datasets.upload("big", file=("big.jsonl", b"x" * (MAX_UPLOAD + 1)))
    assert exc.value.status_code == 413
    folder = data_dir / "datasets" / ACCOUNT / "big"
    assert fw.datasets.get("big").state == "UPLOADING"
    assert not folder.exists() or not any(folder.iterdir())
    # a name that is a path step would put the file outside its folder (once: a file where the account's
    # folder belongs, so that every later upload of the account failed)
    for name in ("..", "."):
        with pytest.raises(fireworks.BadRequestError) as exc:
            fw.datasets.upload("big", file=(name, b"{}\n"))
        assert _error(exc)["param"] == "file"
    assert (data_dir / "datasets" / ACCOUNT).is_dir()
    fw.datasets.upload("big", file=("dir/small.jsonl", _jsonl([_line("a", "Hi")])))  # the folders are dropped
    assert fw.datasets.get("big").state == "READY" and sorted(p.name for p in folder.iterdir()) == ["small.jsonl"]


def test_one_upload_per_dataset_when_several_race(fw, served, data_dir):
    """Uploads sent at once: one wins, the others are 400s (all once succeeded, each leaving its file in the
    dataset's folder while the dataset listed only one)."""
    fw.datasets.create(dataset_id="raced", dataset={"userUploaded": {}})
    url = f"{served.url}/v1/accounts/{ACCOUNT}/datasets/raced:upload"
    data = _jsonl([_line(f"r{i}", "Hi") for i in range(700)])[:MAX_UPLOAD - 1024]
    data = data[:data.rindex(b"\n") + 1]

    async def upload_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(url, files={"file": (f"f{i}.jsonl", data)}) for i in range(6)))

    statuses = [r.status_code for r in asyncio.run(upload_all())]
    assert sorted(statuses) == [200] + [400] * 5, statuses
    dataset = fw.datasets.get("raced")
    assert dataset.state == "READY" and dataset.example_count == str(data.count(b"\n"))
    assert [p.name for p in (data_dir / "datasets" / ACCOUNT / "raced").iterdir()] == \
        [f"f{statuses.index(200)}.jsonl"]


def test_list_datasets_pages_and_order(fw):
    account = "lister"
    created = [f"accounts/{account}/datasets/d{i}" for i in (3, 0, 4, 1, 2)]  # not in name order
    for name in created:
        fw.datasets.create(dataset_id=name.rsplit("/", 1)[1], dataset={"userUploaded": {}}, account_id=account)
    assert [d.name for d in fw.datasets.list(account_id=account, page_size=2)] == sorted(created)  # 3 pages
    first = fw.datasets.list(account_id=account, page_size=2, order_by="createTime desc")
    assert [d.name for d in first.datasets] == created[:2:-1]
    assert first.next_page_token and first.has_next_page()
    second = fw.datasets.list(account_id=account, page_size=2, order_by="createTime desc",
                              page_token=first.next_page_token)
    assert [d.name for d in second.datasets] == created[2:0:-1]
    last = second.get_next_page()
    assert [d.name for d in last.datasets] == created[:1] and not last.next_page_token
    assert not last.has_next_page()
    assert [d.name for d in fw.datasets.list(account_id=account, order_by="createTime")] == created
    assert [d.name for d in fw.datasets.list(account_id=account, order_by="name desc")] == sorted(created)[::-1]
    forged = base64.urlsafe_b64encode(str(10**30).encode()).decode()
    for bad in ({"page_token": forged}, {"page_token": "not-a-token"}, {"order_by": "size"},
                {"order_by": "name sideways"}):
        with pytest.raises(fireworks.BadRequestError):
            fw.datasets.list(account_id=account, **bad)


# download URLs


def _tampered(url: str, index: int) -> str:
    """The URL with one character of its token changed."""
    head, token = url.rsplit("/", 1)
    swapped = "B" if token[index] != "B" else "C"
    return f"{head}/{token[:index]}{swapped}{token[index + 1:]}"


def test_download_urls_serve_the_file_and_resist_tampering(fw, served):
    data = _jsonl([_line("x", "Hello")])
    _dataset(fw, "dl", data, filename="dl.jsonl")
    _dataset(fw, "dl-other", b'{"secret": true}\n', filename="other.jsonl")
    urls = fw.datasets.get_download_endpoint("dl").filename_to_signed_urls
    assert list(urls) == ["dl.jsonl"] and urls["dl.jsonl"].startswith(f"{served.url}/downloads/")
    url = urls["dl.jsonl"]
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data

    for bad in (_tampered(url, 3), _tampered(url, -1), url.rsplit(".", 1)[0], f"{served.url}/downloads/x",
                f"{served.url}/downloads/abc.%C3%A9%C3%A9"):
        assert httpx.get(bad).status_code == 403, bad
    # the payload names the path: pointing it at another dataset's file (keeping the signature) is refused
    payload, mac = url.rsplit("/", 1)[1].split(".")
    path, expires = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode().rsplit("|", 1)
    assert path == f"get:datasets/{ACCOUNT}/dl/dl.jsonl"
    other = base64.urlsafe_b64encode(f"get:datasets/{ACCOUNT}/dl-other/other.jsonl|{expires}".encode()).decode()
    assert httpx.get(f"{served.url}/downloads/{other.rstrip('=')}.{mac}").status_code == 403
    later = base64.urlsafe_b64encode(f"{path}|{int(expires) + 10**6}".encode()).decode()  # a longer life
    assert httpx.get(f"{served.url}/downloads/{later.rstrip('=')}.{mac}").status_code == 403

    fw.datasets.delete("dl")
    assert httpx.get(url).status_code == 404


def test_download_urls_need_no_api_key(keyed):
    fw = Fireworks(base_url=keyed.url, api_key=API_KEY, account_id=ACCOUNT, max_retries=0)
    data = _jsonl([_line("k", "Hi")])
    _dataset(fw, "keyed", data)
    url = fw.datasets.get_download_endpoint("keyed").filename_to_signed_urls["input.jsonl"]
    assert url.startswith(f"{keyed.url}/downloads/")
    r = httpx.get(url)  # no key
    assert r.status_code == 200 and r.content == data
    assert httpx.get(_tampered(url, 5)).status_code == 403
    assert httpx.get(f"{keyed.url}/v1/accounts/{ACCOUNT}/datasets/keyed").status_code == 401
    with pytest.raises(fireworks.AuthenticationError):
        Fireworks(base_url=keyed.url, api_key="wrong", account_id=ACCOUNT, max_retries=0).datasets.get("keyed")


# jobs


def test_job_end_to_end_matches_live_requests(fw, served):
    records = [
        _line("sea", "Write one long sentence about the sea."),
        _line("own-max", "Write one long sentence about the sea.", max_tokens=4),  # its own field wins
        _line("count", "Count from one to ten."),
        {"custom_id": "system", "body": {"messages": [{"role": "system", "content": "Answer in French."},
                                                      {"role": "user", "content": "Name a colour."}]}},
        _line("capital", "What is the capital of France?", temperature=0),
    ]
    _dataset(fw, "e2e-in", _jsonl(records))
    params = {"max_tokens": 12, "temperature": 0, "top_p": 0.9, "top_k": 40, "n": 1,
              "extra_body": json.dumps({"stop": ["\n"]})}
    job = fw.batch_inference_jobs.create(batch_inference_job_id="e2e", model=FW_MODEL, input_dataset_id="e2e-in",
                                         output_dataset_id="e2e-results", display_name="End to end",
                                         inference_parameters=params)
    assert job.name == f"accounts/{ACCOUNT}/batchInferenceJobs/e2e" and job.display_name == "End to end"
    assert job.state in ("JOB_STATE_VALIDATING", "JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert job.input_dataset_id == f"accounts/{ACCOUNT}/datasets/e2e-in"
    assert job.output_dataset_id == f"accounts/{ACCOUNT}/datasets/e2e-results"
    assert job.inference_parameters.max_tokens == 12 and job.inference_parameters.top_k == 40
    assert json.loads(job.inference_parameters.extra_body) == {"stop": ["\n"]}

    job = _wait_job(fw, "e2e")
    assert job.state == "JOB_STATE_COMPLETED" and job.status.code == "OK", job.status
    output = fw.datasets.get("e2e-results")
    assert output.state == "READY" and output.example_count == str(len(records))
    assert output.source_job_name == job.name
    files = _files(fw, "e2e-results")
    assert list(files) == [OUTPUT]  # nothing failed: no error file
    results = _records(files[OUTPUT])
    assert sorted(r["custom_id"] for r in results) == sorted(r["custom_id"] for r in records)
    by_id = {r["custom_id"]: r["response"] for r in results}

    p = job.job_progress
    assert (p.percent, p.total_input_requests, p.total_processed_requests, p.successfully_processed_requests,
            p.failed_requests, p.output_rows) == (100, 5, 5, 5, 0, 5)
    usage = [r["usage"] for r in by_id.values()]
    assert p.input_tokens == sum(u["prompt_tokens"] for u in usage) > 0
    assert p.output_tokens == sum(u["completion_tokens"] for u in usage) > 0
    assert p.cached_input_token_count == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)

    defaults = {"max_tokens": 12, "temperature": 0, "top_p": 0.9, "top_k": 40, "n": 1, "stop": ["\n"]}
    for record in records:
        response = by_id[record["custom_id"]]
        assert response["object"] == "chat.completion" and response["model"] == FW_MODEL
        live = served.post("/v1/chat/completions", {**defaults, **record["body"], "model": FW_MODEL})
        assert live.status_code == 200, live.text
        want = live.json()
        assert [(c["message"], c["finish_reason"]) for c in response["choices"]] == \
            [(c["message"], c["finish_reason"]) for c in want["choices"]], record["custom_id"]
        assert response["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
        text, finish = response["choices"][0]["message"]["content"], response["choices"][0]["finish_reason"]
        assert "\n" not in text[:-1] and (finish == "stop") >= text.endswith("\n")  # extraBody's stop (kept)
    assert any(r["choices"][0]["message"]["content"].endswith("\n") for r in by_id.values())
    assert by_id["own-max"]["usage"]["completion_tokens"] == 4 < by_id["sea"]["usage"]["completion_tokens"]


def test_run_time_failures_go_to_error_data_and_default_output(fw):
    records = [_line("fine", "Say hi.", max_tokens=4),
               _line("too-long", "Say hi.", max_tokens=9000, context_length_exceeded_behavior="error"),
               _line("also-fine", "Say bye.", max_tokens=4)]
    _dataset(fw, "errs-in", _jsonl(records))
    job = fw.batch_inference_jobs.create(batch_inference_job_id="errs", model=MODEL, input_dataset_id="errs-in")
    assert job.output_dataset_id == f"accounts/{ACCOUNT}/datasets/errs-output"
    job = _wait_job(fw, "errs")
    assert job.state == "JOB_STATE_COMPLETED"
    p = job.job_progress
    assert (p.percent, p.total_input_requests, p.total_processed_requests, p.successfully_processed_requests,
            p.failed_requests, p.output_rows) == (100, 3, 3, 2, 1, 2)
    output = fw.datasets.get("errs-output")
    assert output.state == "READY" and output.example_count == "2"
    files = _files(fw, "errs-output")
    assert sorted(files) == [OUTPUT, ERRORS]
    assert [r["custom_id"] for r in _records(files[OUTPUT])] == ["fine", "also-fine"]
    (error,) = _records(files[ERRORS])
    assert error["custom_id"] == "too-long" and error["error"]["code"] == 400
    assert "context window" in error["error"]["message"]


MALFORMED = {
    "bad JSON": ([_jsonl([_line(f"r{i}", "Hi") for i in range(6)]) + b'{"custom_id": "r6", "body": {'], 7, "JSON"),
    "duplicate custom_id": ([_line("a", "Hi"), _line("b", "Hi"), _line("a", "Hi")], 3, "custom_id"),
    "unknown line field": ([_line("a", "Hi"), {**_line("b", "Hi"), "url": "/v1/chat/completions"}], 2, "url"),
    "unknown body field": ([_line("a", "Hi"), _line("b", "Hi"), _line("c", "Hi", temprature=0.5)], 3,
                           "temprature"),
    "another model": ([_line("a", "Hi", model="other-model")], 1, "model"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_dataset_fails_the_job_naming_the_line(fw, case):
    records, line, words = MALFORMED[case]
    slug = case.replace(" ", "-").replace("_", "-").lower()
    data = records[0] if isinstance(records[0], bytes) else _jsonl(records)
    _dataset(fw, f"bad-{slug}", data)
    fw.batch_inference_jobs.create(batch_inference_job_id=f"bad-{slug}", model=MODEL,
                                   input_dataset_id=f"bad-{slug}")
    job = _wait_job(fw, f"bad-{slug}")
    assert job.state == "JOB_STATE_FAILED" and job.status.code == "INVALID_ARGUMENT"
    assert job.status.message.startswith(f"line {line}:") and words in job.status.message, job.status.message
    assert job.job_progress.total_processed_requests == 0


def test_create_errors(fw):
    _dataset(fw, "ok-in", _jsonl([_line("a", "Hi", max_tokens=2)]))
    fw.datasets.create(dataset_id="empty-in", dataset={"userUploaded": {}})

    def refused(kind: type, **kw) -> dict:
        with pytest.raises(kind) as exc:
            fw.batch_inference_jobs.create(**{"model": MODEL, "input_dataset_id": "ok-in", **kw})
        return _error(exc)

    assert refused(fireworks.NotFoundError, model="no-such-model")["param"] == "model"
    assert "missing" in refused(fireworks.NotFoundError, input_dataset_id="missing")["message"]
    assert refused(fireworks.BadRequestError, input_dataset_id="empty-in")["param"] == "inputDatasetId"
    assert refused(fireworks.BadRequestError, input_dataset_id="accounts/other/datasets/ok-in")["param"] == \
        "inputDatasetId"
    fp8 = refused(fireworks.BadRequestError, precision="FP8")
    assert fp8["param"] == "precision" and "not supported" in fp8["message"]
    unknown = refused(fireworks.BadRequestError, extra_body={"temprature": 0})
    assert unknown["param"] == "temprature" and "temprature" in unknown["message"]
    assert refused(fireworks.BadRequestError, inference_parameters={"extra_body": "{not json"})["param"] == \
        "inferenceParameters.extraBody"
    assert refused(fireworks.BadRequestError, batch_inference_job_id="Upper")["param"] == "batchInferenceJobId"
    # a streamed line's chunks were once stored as its answer, the line counted a success
    streamed = refused(fireworks.BadRequestError, inference_parameters={"extra_body": '{"stream": true}'})
    assert streamed["param"] == "inferenceParameters.extraBody" and "stream" in streamed["message"]

    fw.batch_inference_jobs.create(batch_inference_job_id="once", model=MODEL, input_dataset_id="ok-in")
    assert refused(fireworks.ConflictError, batch_inference_job_id="once", output_dataset_id="once-2")["param"] == \
        "batchInferenceJobId"
    with pytest.raises(fireworks.NotFoundError):  # the refused create left no output dataset behind
        fw.datasets.get("once-2")
    assert refused(fireworks.ConflictError, batch_inference_job_id="twice", output_dataset_id="ok-in")["param"] == \
        "outputDatasetId"
    assert _wait_job(fw, "once").state == "JOB_STATE_COMPLETED"


def test_concurrent_creates_of_one_job_id(fw, served):
    """Exactly one wins; the others are 409s that leave no output dataset (they once were all 200s, each with its
    own output dataset, and one a 500)."""
    _dataset(fw, "race-in", _jsonl([_line("a", "Hi", max_tokens=2)]))
    base = f"{served.url}/v1/accounts/{ACCOUNT}"

    async def create_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(
                f"{base}/batchInferenceJobs", params={"batchInferenceJobId": "race"},
                json={"model": MODEL, "inputDatasetId": "race-in", "outputDatasetId": f"race-out-{i}"})
                for i in range(6)))

    statuses = [r.status_code for r in asyncio.run(create_all())]
    assert sorted(statuses) == [200] + [409] * 5, statuses
    winner = statuses.index(200)
    for i in range(6):
        exists = httpx.get(f"{base}/datasets/race-out-{i}").status_code == 200
        assert exists == (i == winner), i
    assert _wait_job(fw, "race").state == "JOB_STATE_COMPLETED"


def test_input_deleted_while_its_job_is_created(fw, served):
    """A create racing the input dataset's delete either wins (the job keeps its own copy and completes) or is a
    404 that leaves no output dataset; it was a 500 about a third of the time, with an orphan output dataset."""
    base = f"{served.url}/v1/accounts/{ACCOUNT}"
    data = _jsonl([_line("a", "Hi", max_tokens=1)])
    outcomes = []

    async def race(i: int) -> tuple[int, int]:
        async with httpx.AsyncClient(timeout=30) as client:
            async def delete() -> httpx.Response:
                await asyncio.sleep(0.002 * (i % 5))
                return await client.delete(f"{base}/datasets/vanish-{i}")

            created, deleted = await asyncio.gather(client.post(
                f"{base}/batchInferenceJobs", params={"batchInferenceJobId": f"vanish-{i}"},
                json={"model": MODEL, "inputDatasetId": f"vanish-{i}"}), delete())
            return created.status_code, deleted.status_code

    for i in range(20):
        _dataset(fw, f"vanish-{i}", data)
        outcomes.append(asyncio.run(race(i)))
    assert {deleted for _, deleted in outcomes} == {200}
    assert {created for created, _ in outcomes} <= {200, 404}, outcomes
    for i, (created, _) in enumerate(outcomes):
        if created == 200:
            assert _wait_job(fw, f"vanish-{i}").state == "JOB_STATE_COMPLETED"
            assert fw.datasets.get(f"vanish-{i}-output").state == "READY"
        else:
            with pytest.raises(fireworks.NotFoundError):
                fw.datasets.get(f"vanish-{i}-output")


def test_an_output_dataset_made_again_by_the_client_is_left_alone(fw):
    """The job's output dataset deleted while it runs and a dataset of the same id made by the client: the job
    ends without writing into it (it once added its results and changed its exampleCount)."""
    _dataset(fw, "usurped-in", _jsonl([_line(f"r{i}", "Hi", max_tokens=16, ignore_eos=True) for i in range(20)]))
    fw.batch_inference_jobs.create(batch_inference_job_id="usurped", model=MODEL, input_dataset_id="usurped-in",
                                   output_dataset_id="usurped-out")
    fw.datasets.delete("usurped-out")
    mine = _jsonl([_line("mine", "Hello")])
    _dataset(fw, "usurped-out", mine, filename="mine.jsonl")
    assert fw.batch_inference_jobs.get("usurped").state not in ENDED  # else this test shows nothing
    assert _wait_job(fw, "usurped").state == "JOB_STATE_COMPLETED"
    dataset = fw.datasets.get("usurped-out")
    assert dataset.example_count == "1" and dataset.source_job_name is None
    assert _files(fw, "usurped-out") == {"mine.jsonl": mine}


def test_n_and_structured_output_in_a_job(fw):
    schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
              "additionalProperties": False}
    records = [_line("plain", "Name a fruit."),
               _line("json", "Is the sky blue? Answer in JSON.", max_tokens=24,
                     response_format={"type": "json_schema",
                                      "json_schema": {"name": "yes_no", "schema": schema, "strict": True}})]
    _dataset(fw, "multi-in", _jsonl(records))
    fw.batch_inference_jobs.create(batch_inference_job_id="multi", model=FW_MODEL, input_dataset_id="multi-in",
                                   inference_parameters={"n": 2, "max_tokens": 8, "temperature": 0.8})
    job = _wait_job(fw, "multi")
    assert job.state == "JOB_STATE_COMPLETED" and job.job_progress.successfully_processed_requests == 2
    by_id = {r["custom_id"]: r["response"] for r in _records(_files(fw, "multi-output")[OUTPUT])}
    for response in by_id.values():
        assert [c["index"] for c in response["choices"]] == [0, 1]
    for choice in by_id["json"]["choices"]:
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"])["answer"], bool)
    assert job.job_progress.output_tokens == sum(r["usage"]["completion_tokens"] for r in by_id.values())


def test_list_jobs_pages(fw):
    account = "pager"
    _dataset(fw, "tiny", _jsonl([_line("a", "Hi", max_tokens=2)]), account=account)
    names = []
    for i in range(3):
        names.append(fw.batch_inference_jobs.create(batch_inference_job_id=f"job-{i}", model=MODEL,
                                                    input_dataset_id="tiny", account_id=account).name)
    first = fw.batch_inference_jobs.list(account_id=account, page_size=2)
    assert [j.name for j in first.batch_inference_jobs] == names[:2] and first.next_page_token
    second = fw.batch_inference_jobs.list(account_id=account, page_size=2, page_token=first.next_page_token)
    assert [j.name for j in second.batch_inference_jobs] == names[2:] and not second.next_page_token
    assert [j.name for j in fw.batch_inference_jobs.list(account_id=account, page_size=1)] == names
    assert [j.name for j in fw.batch_inference_jobs.list(account_id=account, order_by="createTime desc")] == \
        names[::-1]
    assert not any(j.name.startswith(f"accounts/{account}/") for j in fw.batch_inference_jobs.list())  # acme's
    for i in range(3):
        assert _wait_job(fw, f"job-{i}", account=account).state == "JOB_STATE_COMPLETED"


def test_deleting_a_running_job_cancels_it(fw, served):
    total = 150
    records = [_line(f"r{i}", f"Tell me a story about the number {i}.") for i in range(total)]
    _dataset(fw, "doomed-in", _jsonl(records))
    served.wait_idle()
    fw.batch_inference_jobs.create(batch_inference_job_id="doomed", model=MODEL, input_dataset_id="doomed-in",
                                   inference_parameters={"max_tokens": 32, "extra_body": '{"ignore_eos": true}'})
    deadline = time.monotonic() + 60
    while (job := fw.batch_inference_jobs.get("doomed")).job_progress.total_processed_requests == 0:
        assert job.state not in ENDED and time.monotonic() < deadline, job.state
        time.sleep(0.05)
    assert job.state == "JOB_STATE_RUNNING"
    fw.batch_inference_jobs.delete("doomed")
    with pytest.raises(fireworks.NotFoundError):
        fw.batch_inference_jobs.get("doomed")
    assert "doomed" not in {j.name.rsplit("/", 1)[1] for j in fw.batch_inference_jobs.list()}
    with pytest.raises(fireworks.NotFoundError):
        fw.batch_inference_jobs.delete("doomed")

    deadline = time.monotonic() + 30
    while (output := fw.datasets.get("doomed-output")).state != "READY":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    done = _records(_files(fw, "doomed-output")[OUTPUT])
    ids = [r["custom_id"] for r in done]
    assert 0 < len(done) < total and len(set(ids)) == len(ids) and output.example_count == str(len(done))
    assert all(r["response"]["usage"]["completion_tokens"] == 32 for r in done)  # only whole answers
    stats = served.wait_idle()
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0


def test_shards_put_to_signed_upload_urls_make_one_dataset(fw, served, data_dir):
    """getUploadEndpoint signs a PUT URL per file for its exact size (no API key needed: the URL is the
    credential); validateUpload makes the dataset READY once every file is whole; a job reads the shards in
    name order as one file."""
    shards = {"part-1.jsonl": _jsonl([_line(f"s{i}", f"Say {i}", max_tokens=4, temperature=0) for i in range(3)]),
              "part-2.jsonl": _jsonl([_line(f"s{i}", f"Say {i}", max_tokens=4, temperature=0) for i in range(3, 5)])}
    fw.datasets.create(dataset_id="sharded", dataset={"userUploaded": {}})
    urls = fw.datasets.get_upload_endpoint(
        "sharded", filename_to_size={n: str(len(d)) for n, d in shards.items()}).filename_to_signed_urls
    assert set(urls) == set(shards) and all(u.startswith(f"{served.url}/uploads/") for u in urls.values())
    with pytest.raises(fireworks.BadRequestError):  # nothing uploaded yet
        fw.datasets.validate_upload("sharded", body={})
    name, url = "part-1.jsonl", urls["part-1.jsonl"]
    assert httpx.put(url, content=shards[name] + b"x").status_code == 400  # not the size registered
    assert not (data_dir / "datasets" / ACCOUNT / "sharded" / name).exists()
    payload, mac = url.rsplit("/", 1)[1].split(".")
    forged = f"{url.rsplit('/', 1)[0]}/{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{mac}"
    assert httpx.put(forged, content=shards[name]).status_code == 403
    for name, data in shards.items():
        assert httpx.put(urls[name], content=data).status_code == 200
    fw.datasets.validate_upload("sharded", body={})
    got = fw.datasets.get("sharded")
    assert got.state == "READY" and got.example_count == "5"
    assert "_expectedFiles" not in got.to_dict()
    fw.batch_inference_jobs.create(model=FW_MODEL, input_dataset_id="sharded", batch_inference_job_id="shards")
    job = _wait_job(fw, "shards")
    assert job.state == "JOB_STATE_COMPLETED" and job.job_progress.successfully_processed_requests == 5
    assert sorted(r["custom_id"] for r in _records(_files(fw, "shards-output")[OUTPUT])) == [f"s{i}" for i in range(5)]
    with pytest.raises(fireworks.BadRequestError):  # a dataset with data takes no more
        fw.datasets.get_upload_endpoint("sharded", filename_to_size={"more.jsonl": "10"})
