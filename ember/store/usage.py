"""Usage records: one row per finished request on any endpoint (successes and 4xx alike), and the
aggregates over time that `GET /v1/usage` and the dashboard show and an operator would bill from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, Engine, Float, Integer, String, Table, and_, func, select

from ember.store.db import METADATA, storable

usage_records = Table(  # the schema of migrations/versions/0001_usage_records.py
    "usage_records", METADATA,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("model", String(256), nullable=False),
    Column("status", Integer, nullable=False),
    Column("finish_reason", String(32)),
    Column("error_type", String(64)),
    Column("streamed", Boolean, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("ttft", Float),
    Column("latency", Float, nullable=False),
    Column("queue_time", Float),
    Column("user", String(256)),
    Column("prompt_cache_key", String(256)),
    Column("session_affinity", String(256)),
    Column("multi_turn_session_id", String(256)),
    Column("metadata", JSON),
    Column("batch_id", String(256)),  # the batch job a line ran for (migration 0003)
)


@dataclass
class UsageRecord:
    ts: float  # seconds since the epoch, when the request finished
    request_id: str
    endpoint: str  # e.g. "chat.completions"
    model: str
    status: int  # the HTTP status answered
    latency: float  # seconds from arrival to the last byte
    streamed: bool = False
    finish_reason: str | None = None
    error_type: str | None = None  # the error envelope's type when status >= 400
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    queue_time: float | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    session_affinity: str | None = None
    multi_turn_session_id: str | None = None
    metadata: dict[str, str] | None = field(default=None)
    batch_id: str | None = None  # set on the requests a batch job makes

    def row(self) -> dict[str, Any]:
        """The row to insert, its text storable (a client's lone surrogates escaped)."""
        return {k: storable(v) for k, v in asdict(self).items()}


BUCKETS = {"minute": 60, "hour": 3600, "day": 86400}
GROUPS = {"model": usage_records.c.model, "endpoint": usage_records.c.endpoint, "user": usage_records.c.user,
          "batch": usage_records.c.batch_id}  # batch: per batch job (null: live requests)


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of unsorted values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def aggregate(engine: Engine, start: float, end: float, bucket: str = "hour", model: str | None = None,
              group_by: str | None = None) -> list[dict[str, Any]]:
    """Per time bucket (and group): requests, errors, tokens in / cached / out, TTFT and latency p50 / p95,
    for records with start <= ts < end. Sums come from SQL; percentiles from the bucket's values."""
    t = usage_records.c
    width = BUCKETS[bucket]
    start_of = (func.floor(t.ts / width) * width).label("start")
    group = GROUPS[group_by].label("group") if group_by else None
    keys = [start_of] + ([group] if group is not None else [])
    where = and_(t.ts >= start, t.ts < end, *([t.model == model] if model else []))
    sums = select(*keys, func.count().label("requests"),
                  func.sum((t.status >= 400).cast(Integer)).label("errors"),
                  func.sum(t.prompt_tokens).label("prompt_tokens"), func.sum(t.cached_tokens).label("cached_tokens"),
                  func.sum(t.completion_tokens).label("completion_tokens")).where(where).group_by(*keys)
    timings = select(*keys, t.ttft, t.latency).where(where)
    with engine.connect() as connection:
        rows = connection.execute(sums).mappings().all()
        samples: dict[tuple, tuple[list[float], list[float]]] = {}
        for r in connection.execute(timings).mappings():
            ttfts, latencies = samples.setdefault((float(r["start"]), r.get("group")), ([], []))
            if r["ttft"] is not None:
                ttfts.append(r["ttft"])
            latencies.append(r["latency"])
    out = []
    for r in rows:
        ttfts, latencies = samples.get((float(r["start"]), r.get("group")), ([], []))
        out.append({"start": float(r["start"]), "end": float(r["start"]) + width,
                    **({"group": r["group"]} if group_by else {}),
                    "requests": r["requests"], "errors": int(r["errors"] or 0),
                    "prompt_tokens": int(r["prompt_tokens"] or 0), "cached_tokens": int(r["cached_tokens"] or 0),
                    "completion_tokens": int(r["completion_tokens"] or 0),
                    "ttft_p50": _percentile(ttfts, 0.5), "ttft_p95": _percentile(ttfts, 0.95),
                    "latency_p50": _percentile(latencies, 0.5), "latency_p95": _percentile(latencies, 0.95)})
    return sorted(out, key=lambda b: (b["start"], str(b.get("group"))))
