"""`ember batch` run as a user runs it, a subprocess: against a launched server (--url) and with the model in its
own process; the output and error files, resume after a partial run or Ctrl-C, the progress bar and exit codes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.server import MODEL, Server, launch

pytestmark = pytest.mark.timeout(120)


def line(i: int, shape: str = "openai", max_tokens: int = 8, **body) -> dict:
    """Request i of a batch file; a Fireworks line names no model unless `body` does."""
    body = {"messages": [{"role": "user", "content": f"Say the number {i}."}], "max_tokens": max_tokens, **body}
    if shape == "fireworks":
        return {"custom_id": f"r{i}", "body": body}
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, **body}}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_text().splitlines()] if path.exists() else []


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ember.cli", "batch", *args]


def ember_batch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=100,
                          env={**os.environ, **(env or {})})


def on_terminal(*args: str) -> tuple[int, str]:
    """Run with stderr on a 100-column terminal (a pty): its exit code and everything it showed there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(command(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the command has exited and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(timeout=100), shown.decode(errors="replace")


def check_results(path: Path, ids: list[str], status: int = 200) -> list[dict]:
    """The results file holds each of `ids` once, in OpenAI's batch output format."""
    results = read_jsonl(path)
    assert Counter(r["custom_id"] for r in results) == Counter(ids)
    for r in results:
        assert r["id"].startswith("batch_req_") and r["error"] is None
        assert r["response"]["status_code"] == status
    return results


def test_help_and_command_list():
    listed = subprocess.run([sys.executable, "-m", "ember.cli"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 2 and "batch" in listed.stderr
    shown = ember_batch("--help")
    assert shown.returncode == 0
    for flag in ("--url", "--api-key", "--endpoint", "--model", "--concurrency", "--error-file", "--overwrite",
                 "--quiet", "--model-path", "--max-num-seqs", "Resume", "Exit status"):
        assert flag in shown.stdout


def test_remote_openai_file(server: Server, tmp_path: Path):
    batch = write_jsonl(tmp_path / "in.jsonl", [line(i) for i in range(20)])
    out = tmp_path / "out.jsonl"
    done = ember_batch(str(batch), "-o", str(out), "--url", server.url, "--concurrency", "8")
    assert done.returncode == 0, done.stderr
    for r in check_results(out, [f"r{i}" for i in range(20)]):
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["choices"][0]["message"]["content"] and 0 < body["usage"]["completion_tokens"] <= 8
        assert r["response"]["request_id"]
    assert not (tmp_path / "out.errors.jsonl").exists()
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("ember batch: 20 ok, 0 failed, 0 done before;") and "output tok/s" in summary


def test_remote_fireworks_file_takes_model_and_endpoint(server: Server, tmp_path: Path):
    records = [{"custom_id": f"r{i}", "body": {"prompt": f"Once upon a time {i}", "max_tokens": 4}} for i in range(4)]
    batch = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    refused = ember_batch(str(batch), "-o", str(out), "--url", server.url, "--endpoint", "/v1/completions")
    assert refused.returncode == 2 and "line 1:" in refused.stderr and "--model" in refused.stderr
    assert not out.exists()
    done = ember_batch(str(batch), "-o", str(out), "--url", f"{server.url}/v1", "--endpoint", "/v1/completions",
                       "--model", f"accounts/fireworks/models/{MODEL}")
    assert done.returncode == 0, done.stderr
    for r in check_results(out, [f"r{i}" for i in range(4)]):
        assert r["response"]["body"]["object"] == "text_completion"


def test_remote_invalid_body_goes_to_error_file(server: Server, tmp_path: Path):
    batch = write_jsonl(tmp_path / "in.jsonl", [line(0), line(1, max_tokens=-1), line(2)])
    out = tmp_path / "out.jsonl"
    done = ember_batch(str(batch), "-o", str(out), "--url", server.url)
    assert done.returncode == 0, done.stderr
    check_results(out, ["r0", "r2"])
    [failed] = check_results(tmp_path / "out.errors.jsonl", ["r1"], status=400)
    assert failed["response"]["body"]["error"]["param"] == "max_tokens"
    assert "2 ok, 1 failed (in " in done.stderr


def test_in_process_file_completes(tmp_path: Path):
    """Fireworks lines without a model: the loaded model's name fills them in."""
    batch = write_jsonl(tmp_path / "in.jsonl", [line(i, "fireworks") for i in range(10)])
    out = tmp_path / "out.jsonl"
    done = ember_batch(str(batch), "-o", str(out), "--error-file", str(tmp_path / "failed.jsonl"))
    assert done.returncode == 0, done.stderr
    for r in check_results(out, [f"r{i}" for i in range(10)]):
        assert r["response"]["body"]["object"] == "chat.completion" and r["response"]["body"]["model"] == MODEL
    assert not (tmp_path / "failed.jsonl").exists()
    assert "10 ok, 0 failed" in done.stderr


@pytest.mark.parametrize("third", ["{not json", json.dumps(line(2, max_tokens=-1))],
                         ids=["bad-json", "bad-body"])
def test_in_process_invalid_file_exits_2(tmp_path: Path, third: str):
    """Bad JSON fails before the model loads; a bad body as the server would judge it, once it has."""
    batch = tmp_path / "in.jsonl"
    batch.write_text(f"{json.dumps(line(0))}\n{json.dumps(line(1))}\n{third}\n{json.dumps(line(3))}\n")
    out = tmp_path / "out.jsonl"
    done = ember_batch(str(batch), "-o", str(out))
    assert done.returncode == 2
    assert "line 3:" in done.stderr
    assert list(tmp_path.iterdir()) == [batch]


def test_resume_skips_what_is_written_and_overwrite_starts_afresh(server: Server, tmp_path: Path):
    batch = write_jsonl(tmp_path / "in.jsonl", [line(i) for i in range(10)])
    out, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    kept = "".join(json.dumps({"id": f"batch_req_{i}", "custom_id": f"r{i}", "error": None, "response": {
        "status_code": 200, "request_id": "", "body": {"written": "before"}}}) + "\n" for i in range(5))
    out.write_text(kept + '{"id": "batch_req_5", "custom_id": "r5", "resp')  # killed mid-line
    write_jsonl(errors, [{"id": "batch_req_9", "custom_id": "r9", "error": None,
                          "response": {"status_code": 400, "request_id": "", "body": {"error": {}}}}])
    done = ember_batch(str(batch), "-o", str(out), "--url", server.url)
    assert done.returncode == 0, done.stderr
    assert "4 ok, 0 failed, 6 done before" in done.stderr
    assert out.read_text().startswith(kept)
    results = check_results(out, [f"r{i}" for i in range(9)])
    assert [r["response"]["body"].get("written") for r in results] == ["before"] * 5 + [None] * 4
    check_results(errors, ["r9"], status=400)

    again = ember_batch(str(batch), "-o", str(out), "--url", server.url, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert "written" not in out.read_text() and errors.read_text() == ""
    check_results(out, [f"r{i}" for i in range(10)])


def test_ctrl_c_keeps_what_is_written_and_a_rerun_finishes(server: Server, tmp_path: Path):
    batch = write_jsonl(tmp_path / "in.jsonl", [line(i, max_tokens=16) for i in range(20)])
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(command(str(batch), "-o", str(out), "--url", server.url, "--concurrency", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not read_jsonl(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopping" in stderr
    written = read_jsonl(out)
    assert 0 < len(written) < 20
    rerun = ember_batch(str(batch), "-o", str(out), "--url", server.url)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{20 - len(written)} ok, 0 failed, {len(written)} done before" in rerun.stderr
    check_results(out, [f"r{i}" for i in range(20)])


def test_progress_bar_on_a_terminal_unless_quiet(server: Server, tmp_path: Path):
    batch = write_jsonl(tmp_path / "in.jsonl", [line(i) for i in range(5)])
    code, shown = on_terminal(str(batch), "-o", str(tmp_path / "out.jsonl"), "--url", server.url)
    assert code == 0, shown
    assert "5/5" in shown and "out tok/s" in shown and "5 ok, 0 failed" in shown
    code, shown = on_terminal(str(batch), "-o", str(tmp_path / "quiet.jsonl"), "--url", server.url, "--quiet")
    assert code == 0, shown
    assert "5/5" not in shown and "out tok/s" not in shown and "5 ok, 0 failed" in shown


def test_unreachable_server_exits_1(tmp_path: Path):
    batch = write_jsonl(tmp_path / "in.jsonl", [line(i) for i in range(3)])
    out = tmp_path / "out.jsonl"
    with socket.socket() as bound:  # a port of ours that nothing listens on: every connection is refused
        bound.bind(("127.0.0.1", 0))
        done = ember_batch(str(batch), "-o", str(out), "--url", f"http://127.0.0.1:{bound.getsockname()[1]}")
    assert done.returncode == 1
    assert "cannot reach" in done.stderr
    assert read_jsonl(out) == []


def test_api_key_from_the_environment_and_a_refused_key_exits_1(tmp_path: Path):
    batch = write_jsonl(tmp_path / "in.jsonl", [line(i) for i in range(3)])
    with launch("--api-key", "sesame", log=tmp_path / "serve.log") as keyed:
        done = ember_batch(str(batch), "-o", str(tmp_path / "out.jsonl"), "--url", keyed.url,
                           env={"EMBER_API_KEY": "sesame"})
        assert done.returncode == 0, done.stderr
        check_results(tmp_path / "out.jsonl", ["r0", "r1", "r2"])
        refused = ember_batch(str(batch), "-o", str(tmp_path / "refused.jsonl"), "--url", keyed.url,
                              "--api-key", "wrong")
    assert refused.returncode == 1
    assert "refused the API key (401)" in refused.stderr
    assert read_jsonl(tmp_path / "refused.jsonl") == [] and not (tmp_path / "refused.errors.jsonl").exists()
