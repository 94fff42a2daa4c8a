"""GET /metrics through prometheus-client's own parser: engine counters move by what a known request did,
gauges describe the KV cache, and every engine step lands in the phase histogram."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server import MODEL


def _scrape(server) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_counters_move_by_what_a_request_did(server):
    server.wait_idle()
    before = _scrape(server)
    label = (("model", MODEL),)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 9,
            "ignore_eos": True, "temperature": 0}
    usage = server.post("/v1/chat/completions", body).json()["usage"]
    server.wait_idle()
    after = _scrape(server)

    def moved(name: str) -> float:
        return after[(name, label)] - before.get((name, label), 0.0)

    assert moved("ember_generated_tokens_total") == usage["completion_tokens"] == 9
    assert moved("ember_prompt_tokens_total") + moved("ember_cached_prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("ember_cached_prompt_tokens_total") == usage["prompt_tokens_details"]["cached_tokens"]
    assert moved("ember_engine_requests_total") == 1
    steps = moved("ember_engine_steps_total")
    assert steps >= 9
    for phase in ("schedule", "prepare", "forward", "sample", "postprocess"):
        key = ("ember_engine_step_seconds_count", (("model", MODEL), ("phase", phase)))
        assert after[key] - before.get(key, 0.0) == steps
    assert after[("ember_sequences_running", label)] == after[("ember_sequences_waiting", label)] == 0
    answered = ("ember_requests_total", (("endpoint", "chat.completions"), ("model", MODEL), ("status", "200")))
    assert after[answered] - before.get(answered, 0.0) == 1
    for name in ("ember_time_to_first_token_seconds_count", "ember_e2e_request_latency_seconds_count",
                 "ember_request_queue_seconds_count"):
        assert moved(name) == 1, name
    assert moved("ember_inter_token_latency_seconds_count") == 8  # gaps between 9 tokens
    assert after[("ember_kv_blocks_used", label)] == 0 < after[("ember_kv_blocks_cached", label)] \
        <= after[("ember_kv_blocks_total", label)]
    assert 0 <= after[("ember_prefix_cache_hit_ratio", label)] <= 1


def test_refusals_are_counted_without_growing_the_labels(server):
    before = _scrape(server)
    for name in ("no-such-model", "another-made-up-model"):
        assert server.post("/v1/completions", {"model": name, "prompt": "x"}).status_code == 404
    assert httpx.get(f"{server.url}/v1/made/up/path").status_code == 404
    after = _scrape(server)
    unknown = ("ember_requests_total", (("endpoint", "completions"), ("model", "unknown"), ("status", "404")))
    assert after[unknown] - before.get(unknown, 0.0) == 2
    other = ("ember_requests_total", (("endpoint", "other"), ("model", "unknown"), ("status", "404")))
    assert after[other] - before.get(other, 0.0) == 1
    assert not any("made-up" in str(labels) or "no-such" in str(labels) for _, labels in after)
