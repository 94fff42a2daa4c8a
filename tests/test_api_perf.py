"""Fireworks' performance metrics, measured: every header on non-streamed chat and text completions, the
same values in `perf_metrics` (body, or the stream's finishing chunk), phases that are non-negative and
add up to the processing time, and TTFT within it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server import MODEL

PHASES = ("tokenizer-queue-duration", "tokenizer-duration", "prefill-queue-duration", "prefill-duration",
          "generation-queue-duration", "generation-duration")
KEYS = ("prompt-tokens", "cached-prompt-tokens", "server-time-to-first-token", "server-processing-time",
        *PHASES, "num-concurrent-requests", "deployment", "backend-host")


def _check(metrics: dict, prompt_tokens: int) -> None:
    assert set(KEYS) <= set(metrics)
    phases = [float(metrics[p]) for p in PHASES]
    assert min(phases) >= 0
    total, ttft = float(metrics["server-processing-time"]), float(metrics["server-time-to-first-token"])
    assert 0 < ttft <= total
    assert abs(sum(phases) - total) < 0.02, metrics  # the phases make the whole, within a few ms
    assert int(metrics["prompt-tokens"]) == prompt_tokens and metrics["deployment"] == MODEL
    assert int(metrics["num-concurrent-requests"]) >= 1


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}]}),
    ("/v1/completions", {"prompt": "The capital of France is"}),
])
def test_headers_and_body_agree(server, path, body):
    r = server.post(path, {"model": MODEL, **body, "max_tokens": 6, "ignore_eos": True,
                           "perf_metrics_in_response": True, "n": 2})
    assert r.status_code == 200
    data = r.json()
    headers = {k.removeprefix("fireworks-"): v for k, v in r.headers.items() if k.startswith("fireworks-")}
    _check(headers, data["usage"]["prompt_tokens"])
    _check(data["perf_metrics"], data["usage"]["prompt_tokens"])
    assert r.headers["x-request-id"]
    assert int(headers["cached-prompt-tokens"]) == data["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_stream_carries_them_on_its_finishing_chunk(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5, "n": 2,
            "ignore_eos": True, "stream": True, "perf_metrics_in_response": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["fireworks-prompt-tokens"] and r.headers["x-request-id"]
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finishing = [e for e in events if e.get("perf_metrics")]
    assert len(finishing) == 1 and finishing[0] is [e for e in events if e["choices"]][-1]
    _check(finishing[0]["perf_metrics"], finishing[0]["usage"]["prompt_tokens"])
