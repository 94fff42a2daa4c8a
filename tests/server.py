"""Start a real `ember serve` process on a free loopback port for API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ember_server(*extra_args: str, timeout: float = 60.0):
    """Yields the base URL (http://127.0.0.1:PORT) of a running server; kills it afterwards."""
    port = _free_port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def engine_stats(base: str) -> dict:
    return httpx.get(f"{base}/v1/engine/stats").json()[MODEL]


def wait_until_idle(base: str, timeout: float = 10.0) -> dict:
    """Stats once no sequence runs or waits (or the last seen stats at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(base)
        if (stats["num_running"] == 0 and stats["num_waiting"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)
