"""Start real `ember serve` processes on free loopback ports (the API tests' fixtures live in conftest)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny"
TINY_KV_BLOCKS, TINY_BLOCK_SIZE = 12, 16  # 192 tokens of KV cache in all: also the context window
TINY_GENERATION_CONFIG = {"temperature": 0.5, "top_k": 7, "min_p": 0.05}


@dataclass
class Server:
    url: str
    model: str
    startup_s: float
    pid: int  # the `ember serve` process (a test may kill -9 it)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def post(self, path: str, body: dict | None = None, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=kw.pop("timeout", 60), **kw)

    def stream(self, path: str, body: dict) -> list[dict]:
        """The JSON events of a streamed answer, read raw (the SDKs hide fields); checks the [DONE] end."""
        with httpx.stream("POST", f"{self.url}{path}", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200, r.read()
            data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(d) for d in data[:-1]]

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/v1/engine/stats").json()[self.model]

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Stats once no sequence runs or waits (or the last ones seen, at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["num_running"] == stats["num_waiting"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launch(*args: str, model: str = MODEL, env: dict | None = None, log: Path | None = None,
           timeout: float = 120.0) -> Iterator[Server]:
    """`python -m ember.cli serve --port <free> *args`, ready once /health answers; killed afterwards.
    Its output goes to `log` (a pipe nobody reads could fill up and stall the server), and its store (usage
    records) into a data directory beside it unless `env` names one."""
    if log is None:
        with tempfile.TemporaryDirectory() as folder, \
                launch(*args, model=model, env=env, log=Path(folder) / "serve.log", timeout=timeout) as s:
            yield s
        return
    port = _free_port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), *args]
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "EMBER_DATA_DIR": str(log.parent / "data"),
                                     **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"ember serve not healthy after {timeout} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield Server(url, model, time.monotonic() - started, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def ember_server(*args: str, **kw) -> Iterator[str]:
    """Like `launch`, for callers that need only the base URL (http://127.0.0.1:PORT)."""
    with launch(*args, **kw) as s:
        yield s.url
