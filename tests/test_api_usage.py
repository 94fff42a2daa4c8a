"""Usage records through a real server: one row per finished request (2xx and 4xx, streamed or not) with
what it asked and got, `GET /v1/usage` aggregating them, rows surviving a restart, and the dashboard page
and its vendored script served without a key but its data behind it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time

import httpx
import openai
from sqlalchemy import select

from ember.store import Store, StoreConfig
from ember.store.usage import usage_records
from tests.server import MODEL, launch


def _rows(data_dir) -> list[dict]:
    store = Store(StoreConfig(data_dir=str(data_dir)))
    with store.engine.connect() as connection:
        rows = [dict(r) for r in connection.execute(select(usage_records).order_by(usage_records.c.id)).mappings()]
    store.close()
    return rows


def test_every_request_leaves_a_record_that_survives_a_restart(tmp_path):
    data = tmp_path / "data"
    env = {"EMBER_DATA_DIR": str(data)}
    since = time.time() - 1
    with launch(env=env, log=tmp_path / "first.log") as s:
        client = s.client()
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, user="alice",
            metadata={"team": "red"}, extra_headers={"x-session-affinity": "s1", "x-multi-turn-session-id": "t1"},
            extra_body={"prompt_cache_key": "pk", "ignore_eos": True})
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, extra_body={"ignore_eos": True})
        bad = s.post("/v1/chat/completions", {"model": MODEL, "messages": [], "frobnicate": 1})
        assert bad.status_code == 400
        unknown = s.post("/v1/completions", {"model": "no-such-model", "prompt": "x"})
        assert unknown.status_code == 404
        assert client.models.list().data[0].id == MODEL
        deadline = time.monotonic() + 5
        while len(_rows(data)) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
    rows = _rows(data)
    assert [(r["endpoint"], r["status"], r["streamed"]) for r in rows] == [
        ("chat.completions", 200, False), ("chat.completions", 200, True), ("completions", 200, False),
        ("chat.completions", 400, False), ("completions", 404, False), ("models", 200, False)]
    first, streamed = rows[0], rows[1]
    assert (first["model"], first["user"], first["metadata"], first["prompt_cache_key"]) == (
        MODEL, "alice", {"team": "red"}, "pk")
    assert (first["session_affinity"], first["multi_turn_session_id"]) == ("s1", "t1")
    assert first["prompt_tokens"] == answer.usage.prompt_tokens and first["completion_tokens"] == 5
    assert first["finish_reason"] == "length" and first["request_id"] in answer.id
    assert 0 < first["ttft"] <= first["latency"] and first["queue_time"] >= 0
    assert streamed["completion_tokens"] == chunks[-1].usage.completion_tokens == 3
    assert rows[3]["error_type"] == "invalid_request_error" and rows[3]["model"] == MODEL
    assert rows[4]["model"] == "no-such-model" and rows[4]["completion_tokens"] == 0

    with launch(env=env, log=tmp_path / "second.log") as s:  # the same data directory, a new process
        summary = httpx.get(f"{s.url}/v1/usage", params={"start": since, "bucket": "day",
                                                         "group_by": "endpoint"}).json()
    by_endpoint = {b["group"]: b for b in summary["data"]}
    assert by_endpoint["chat.completions"]["requests"] == 3 and by_endpoint["chat.completions"]["errors"] == 1
    assert by_endpoint["completions"]["requests"] == 2 and by_endpoint["completions"]["errors"] == 1
    assert sum(b["completion_tokens"] for b in summary["data"]) == 5 + 3 + 4


def test_usage_query_errors_name_the_field(server):
    for params, field in [({"bucket": "week"}, "bucket"), ({"group_by": "colour"}, "group_by"),
                          ({"start": "yesterday"}, "start"), ({"start": 100, "end": 50}, "start"),
                          ({"start": 0, "bucket": "minute"}, "bucket")]:
        r = httpx.get(f"{server.url}/v1/usage", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (params, r.text)
    iso = httpx.get(f"{server.url}/v1/usage", params={"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00"})
    assert iso.status_code == 200 and iso.json()["end"] - iso.json()["start"] == 86400


def test_dashboard_page_is_open_its_data_is_not(tmp_path):
    with launch("--api-key", "secret", log=tmp_path / "serve.log") as s:
        page = httpx.get(f"{s.url}/dashboard")
        assert page.status_code == 200 and "uPlot" in page.text and "/v1/usage" in page.text
        script = httpx.get(f"{s.url}/dashboard/vendor/uPlot.iife.min.js")
        assert script.status_code == 200 and "uPlot" in script.text[:200]
        assert httpx.get(f"{s.url}/dashboard/vendor/uPlot.LICENSE").status_code == 404  # only the two assets
        assert httpx.get(f"{s.url}/dashboard/vendor/%2e%2e/usage.py").status_code == 404
        assert httpx.get(f"{s.url}/v1/usage").status_code == 401
        keyed = httpx.get(f"{s.url}/v1/usage", headers={"authorization": "Bearer secret"})
        assert keyed.status_code == 200 and keyed.json()["object"] == "list"
        with openai.OpenAI(base_url=f"{s.url}/v1", api_key="secret", max_retries=0) as client:
            assert client.models.list().data[0].id == MODEL


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is missing: apt-get install chromium (.ci/run does)"
    return found


def _render(url: str, profile) -> str:
    """The page's DOM after its script ran, in headless Chromium (no internet, a fresh profile)."""
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120).stdout


def test_dashboard_renders_in_a_browser(tmp_path):
    """Headless Chromium loads the page with no internet, runs its script against /v1/usage and draws the
    cards and charts from the records of the requests just made."""
    with launch(log=tmp_path / "serve.log") as s:
        client = s.client()
        for _ in range(3):
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert s.post("/v1/completions", {"model": MODEL, "prompt": "x", "frobnicate": 1}).status_code == 400
        time.sleep(1.5)  # the store's writer flushes every half second
        dom = _render(f"{s.url}/dashboard", tmp_path / "chromium")
    cards = dict(re.findall(r'<div class="card">([^<]+)<b>([^<]+)</b>', dom))
    assert cards.get("requests") == "4" and cards.get("errors") == "1", dom[-3000:]
    drawn = {chart: json.loads(html.unescape(totals))
             for chart, totals in re.findall(r'<div id="(c-[a-z]+)" data-totals="([^"]+)"', dom)}
    assert drawn["c-requests"] == {"requests": 4, "errors": 1}, drawn
    assert drawn["c-tokens"]["out"] == 6 and drawn["c-tokens"]["in"] > 0  # three answers of 2 tokens
    assert dom.count('class="uplot') >= 4 and "<td>smollm2-135m-instruct</td>" in dom


def test_dashboard_asks_for_the_key_of_a_locked_server(tmp_path):
    with launch("--api-key", "secret", log=tmp_path / "serve.log") as s:
        dom = _render(f"{s.url}/dashboard", tmp_path / "chromium")
    assert '<label id="keybox">' in dom and "an API key is needed" in dom  # the key box shown, no data drawn
    assert '<div class="cards" id="cards"></div>' in dom


def test_records_and_metrics_can_be_turned_off(tmp_path):
    with launch("--no-usage-records", "--no-metrics", log=tmp_path / "serve.log") as s:
        assert s.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
        assert httpx.get(f"{s.url}/metrics").status_code == 404
        assert httpx.get(f"{s.url}/v1/usage").status_code == 404
    assert not (tmp_path / "data" / "ember.db").exists()


def test_a_database_lost_mid_run_fails_no_request(tmp_path):
    """The server records into PostgreSQL; the database stops mid-run: answers keep coming as fast, and
    the records kept meanwhile land once it is back."""
    from tests.test_store import Postgres

    db = Postgres()
    try:
        with launch(env={"EMBER_DATABASE_URL": db.url, "EMBER_FLUSH_INTERVAL": "0.1"}, log=tmp_path / "serve.log") as s:
            client = s.client()

            def ask() -> float:
                start = time.perf_counter()
                assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
                return time.perf_counter() - start

            healthy = [ask() for _ in range(3)]
            db.stop()
            lost = [ask() for _ in range(5)]
            assert max(lost) < max(healthy) + 0.5  # no request waits on the database
            db.start()
            deadline = time.monotonic() + 20
            store = Store(StoreConfig(database_url=db.url))
            try:
                while time.monotonic() < deadline:
                    with store.engine.connect() as connection:
                        rows = connection.execute(select(usage_records.c.status)).scalars().all()
                    if len(rows) == 8:
                        break
                    time.sleep(0.2)
            finally:
                store.close()
            assert rows == [200] * 8
    finally:
        db.remove()
