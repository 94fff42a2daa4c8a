"""One usage record per finished request, written off the request path (the store's buffered writer):
what it asked (endpoint, model, user, cache and session hints, metadata), what it got (status, finish
reason, tokens, error type) and how long it took; the same request feeds /metrics' request counters and
latency histograms. A server without a store keeps no record but still counts."""

from __future__ import annotations

import time

from fastapi import Request

from ember.api.batch.inprocess import batch_job_of
from ember.store import UsageRecord


def endpoint_of(path: str) -> str:
    """"/inference/v1/chat/completions" -> "chat.completions"."""
    tail = path.split("/v1/", 1)[-1]
    return tail.strip("/").replace("/", ".") or "root"


def record(request: Request, status: int, *, model: str = "", request_id: str = "", streamed: bool = False,
           usage: dict | None = None, finish_reason: str | None = None, ttft: float | None = None,
           latency: float | None = None, queue_time: float | None = None, error_type: str | None = None,
           body: object = None, gaps: list[float] | None = None) -> None:
    """`gaps`: seconds between the request's consecutive tokens (the inter-token histogram)."""
    request.state.recorded = True  # (the guard records what no route did)
    endpoint = endpoint_of(request.url.path)
    if latency is None:
        started = getattr(request.state, "started", None)
        latency = time.perf_counter() - started if started else 0.0
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_request(endpoint, model, status, ttft, latency, queue_time, gaps or [])
    store = getattr(request.app.state, "store", None)
    if store is None:
        return
    usage = usage or {}
    store.record_usage(UsageRecord(
        ts=time.time(), request_id=request_id or request.headers.get("x-request-id", ""),
        endpoint=endpoint, model=model, status=status, latency=latency,
        streamed=streamed, finish_reason=finish_reason, error_type=error_type,
        prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), ttft=ttft,
        queue_time=queue_time, user=getattr(body, "user", None),
        prompt_cache_key=getattr(body, "prompt_cache_key", None),
        session_affinity=request.headers.get("x-session-affinity"),
        multi_turn_session_id=request.headers.get("x-multi-turn-session-id"),
        metadata=getattr(body, "metadata", None), batch_id=batch_job_of(request.scope)))
