"""Locks and limits at the HTTP edge, against real server processes: API keys, the Host check, body size
and body/header deadlines, CORS, the drain on SIGTERM, and the OpenAPI document (fuzzed by schemathesis)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server import MODEL, launch

KEYS = ("key-one", "key-two")
FILE_KEY = "key-from-file"
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ember-locked")
    key_file = folder / "keys"
    key_file.write_text(f"# hashed keys\nsha256:{hashlib.sha256(FILE_KEY.encode()).hexdigest()}\n")
    with launch("--api-key-file", str(key_file), "--max-request-bytes", "4096", "--header-timeout", "1",
                "--body-timeout", "1", "--cors-allow-origins", ORIGIN, env={"EMBER_API_KEY": ",".join(KEYS)},
                log=folder / "serve.log") as s:
        yield s


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    return error


def test_api_key_required_everywhere_but_health(locked):
    assert httpx.get(f"{locked.url}/health").status_code == 200
    for path in ("/v1/models", "/inference/v1/models", "/v1/engine/stats", "/openapi.json", "/metrics"):
        error = _error(httpx.get(f"{locked.url}{path}"), 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
    wrong = httpx.post(f"{locked.url}/v1/chat/completions", json=_chat(), headers={"authorization": "Bearer nope"})
    assert _error(wrong, 401, "invalid_api_key") and wrong.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        locked.client().chat.completions.create(**_chat())


@pytest.mark.parametrize("key", [*KEYS, FILE_KEY])
def test_each_key_works_through_the_sdk(locked, key):
    client = openai.OpenAI(base_url=f"{locked.url}/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(**_chat()).choices[0].message.content is not None
    assert httpx.get(f"{locked.url}/v1/models", headers={"x-api-key": key}).status_code == 200


def test_host_header_must_name_this_machine(locked):
    port = locked.url.rsplit(":", 1)[1]
    auth = {"authorization": f"Bearer {KEYS[0]}"}
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{locked.url}/v1/models", headers={**auth, "host": host}).status_code == 200
    for host in ("evil.example", f"attacker.example:{port}", "192.168.1.10"):
        _error(httpx.get(f"{locked.url}/v1/models", headers={**auth, "host": host}), 400, "invalid_host")


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _read_status(sock: socket.socket) -> tuple[int, float]:
    start, data = time.monotonic(), b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ")[1]) if data else 0, time.monotonic() - start


def test_oversized_body_refused_before_it_is_sent(locked):
    """A declared length over the limit gets its 413 while the client has sent only the headers."""
    with _raw(locked.url) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer key-one\r\ncontent-length: 67108864\r\n\r\n")
        status, waited = _read_status(sock)
    assert status == 413 and waited < 2
    chunked = httpx.post(f"{locked.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEYS[0]}"},
                         content=iter([b'{"model": "', b"x" * 3000, b"x" * 3000, b'"}']))  # no content-length
    _error(chunked, 413, "request_too_large")
    padded = _chat(user="x" * 5000)
    _error(httpx.post(f"{locked.url}/v1/chat/completions", json=padded,
                      headers={"authorization": f"Bearer {KEYS[0]}"}), 413, "request_too_large")


def test_slow_body_is_a_408(locked):
    with _raw(locked.url) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer key-one\r\ncontent-length: 100\r\n\r\n{\"model\"")
        status, waited = _read_status(sock)
    assert status == 408 and 0.8 < waited < 5


def test_half_sent_headers_are_dropped(locked):
    """Connections that never finish their headers (one trickling a byte at a time) are closed after the
    header deadline, while a well-behaved client on another connection is answered meanwhile."""
    socks = [_raw(locked.url) for _ in range(20)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
    trickler = socks[0]
    start = time.monotonic()
    closed = False
    while time.monotonic() - start < 5 and not closed:
        try:
            trickler.sendall(b"x")
            trickler.settimeout(0.2)
            closed = trickler.recv(1) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
    assert closed and time.monotonic() - start < 4
    assert httpx.get(f"{locked.url}/health").status_code == 200
    for s in socks[1:]:
        s.settimeout(3)
        assert s.recv(1) == b""  # closed by the server
        s.close()
    trickler.close()


def test_cors_only_for_listed_origins(locked, server):
    preflight = {"origin": ORIGIN, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    r = httpx.options(f"{locked.url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in r.headers
    answer = httpx.post(f"{locked.url}/v1/chat/completions", json=_chat(),
                        headers={"origin": ORIGIN, "authorization": f"Bearer {KEYS[0]}"})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"]
    other = httpx.options(f"{locked.url}/v1/chat/completions", headers={**preflight, "origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # off by default
    plain = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in plain.headers


def test_sigterm_drains_running_streams(tmp_path):
    """A stream running when SIGTERM arrives is answered to its end; the server then exits cleanly and
    refuses what comes after."""
    with launch(log=tmp_path / "serve.log") as s:
        proc = next(p for p in _children() if f"--port {s.url.rsplit(':', 1)[1]}" in p[1])[0]
        events: list[dict] = []
        done = threading.Event()

        def stream() -> None:
            body = _chat(max_tokens=120, ignore_eos=True, stream=True)
            with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                    if line == "data: [DONE]":
                        done.set()

        reader = threading.Thread(target=stream)
        reader.start()
        while not events:
            time.sleep(0.01)
        os.kill(proc, signal.SIGTERM)
        reader.join(timeout=60)
        assert done.is_set()
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"]) for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) > 60
        with pytest.raises(httpx.HTTPError):
            for _ in range(50):  # refused (or a 503) once the listener is closed
                r = httpx.get(f"{s.url}/v1/models", timeout=1)
                if r.status_code == 503:
                    raise httpx.HTTPError("draining")
                time.sleep(0.1)


def _children() -> list[tuple[int, str]]:
    """(pid, command line) of the `ember serve` processes running (`launch` does not expose its Popen)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [(int(line.split(None, 1)[0]), line.split(None, 1)[1]) for line in out.splitlines()
            if "ember.cli serve" in line]


def test_openapi_documents_the_real_answers(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(responses) and "422" not in responses
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")


def test_schemathesis_finds_no_server_error_or_nonconformance(server, tmp_path):
    """schemathesis fuzzes every operation from the server's own OpenAPI document, bounded: the test's copy
    names the served model (so bodies reach the engine, not just a 404) and keeps generations short."""
    doc = httpx.get(f"{server.url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [MODEL, f"accounts/fireworks/models/{MODEL}"]}
        # always a short max_tokens (left out, it defaults to 2048 tokens of generation per example)
        props["max_tokens"] = {"type": "integer", "minimum": 0, "maximum": 8}
        props.pop("max_completion_tokens", None)
        schemas[name]["required"] = sorted({*schemas[name].get("required", []), "model", "max_tokens"})
        props["n"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 2}, {"type": "null"}]}
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(doc))
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
              "response_headers_conformance,response_schema_conformance,unsupported_method")
    cli = str(Path(sys.executable).parent / "schemathesis")
    run = subprocess.run([cli, "run", str(schema_file), "--url", server.url,
                          "--checks", checks, "--max-examples", "15", "--seed", "7", "--request-timeout", "60",
                          "--generation-deterministic"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    assert run.returncode == 0, run.stdout[-6000:]
    assert "passed" in summary and "failures" not in summary.lower(), summary

