"""The load generator: its statistics and SSE parsing (pure), a run against a fake streaming server
(fast), and one real run against `ember serve`."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest

from ember import bench
from ember.bench import (
    BenchConfig,
    RequestResult,
    StreamTimer,
    add_arguments,
    build_request,
    chunk_text,
    make_prompt,
    markdown_table,
    parse_sse_line,
    percentile,
    readable_summary,
    run_benchmark,
    summarize,
)
from tests.server import ember_server


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_percentile():
    assert percentile([], 50) == 0.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([5, 1, 3], 0) == 1 and percentile([5, 1, 3], 100) == 5
    assert percentile([0, 10], 90) == pytest.approx(9.0)


def test_parse_sse_line():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line("event: message") is None
    with pytest.raises(ValueError):
        parse_sse_line("data: {not json")


def test_chunk_text():
    assert chunk_text({"choices": [{"delta": {"content": "hi"}}]}) == "hi"
    assert chunk_text({"choices": [{"text": "yo"}]}) == "yo"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def _usage(prompt: int, completion: int) -> str:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return "data: " + json.dumps({"choices": [], "usage": usage})


def _content(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})


def test_stream_timer_ttft_itl_and_usage():
    timer = StreamTimer(start=10.0)
    timer.feed("data: " + json.dumps({"choices": [{"delta": {"role": "assistant"}}]}), 10.05)  # no content
    timer.feed(_content("a"), 10.2)
    timer.feed("", 10.2)
    timer.feed(_content("b"), 10.25)
    timer.feed(_content("c"), 10.35)
    timer.feed(_usage(40, 5), 10.4)
    timer.feed("data: [DONE]", 10.4)
    r = timer.finish(10.5)
    assert r.ok and r.usage_reported
    assert r.ttft == pytest.approx(0.2) and r.latency == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.05, 0.1])
    assert (r.prompt_tokens, r.completion_tokens) == (40, 5)  # usage wins over the 3 chunks


def test_stream_timer_without_usage_counts_chunks():
    timer = StreamTimer(start=0.0)
    for i, t in enumerate((0.1, 0.2, 0.3)):
        timer.feed(_content(str(i)), t)
    r = timer.finish(0.3)
    assert r.completion_tokens == 3 and r.prompt_tokens == 0 and not r.usage_reported


def test_stream_timer_no_content_and_errors():
    r = StreamTimer(start=1.0).finish(1.5)
    assert r.ok and r.ttft == pytest.approx(0.5) and r.completion_tokens == 0
    with pytest.raises(ValueError, match="error event"):
        StreamTimer(0.0).feed('data: {"error": {"message": "boom"}}', 0.1)


def test_prompts_differ_from_the_first_word():
    prompts = [make_prompt(i, 100) for i in range(20)]
    assert len({p.split()[0] for p in prompts}) == 20
    assert make_prompt(3, 100) == make_prompt(3, 100)
    assert make_prompt(3, 100, seed=1) != make_prompt(3, 100)
    assert len(make_prompt(0, 512).split()) > 4 * len(make_prompt(0, 100).split())


def test_build_request_bodies():
    cfg = BenchConfig(max_tokens=7, ignore_eos=True, eos_bias=2, extra_body='{"top_k": 5}')
    path, body = build_request(cfg, 4, "m")
    assert path == "/chat/completions"
    assert body["messages"][0]["content"] == make_prompt(4, 100)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["logit_bias"] == {"2": -100} and body["top_k"] == 5
    assert body["model"] == "m" and body["max_tokens"] == 7
    path, body = build_request(BenchConfig(endpoint="completions"), 0, "m")
    assert path == "/completions" and "prompt" in body
    assert "ignore_eos" not in body and "logit_bias" not in body
    with pytest.raises(ValueError):
        build_request(BenchConfig(extra_body="[1]"), 0, "m")


def test_workloads_code_edit_and_rewrite(tokenizer):
    _, body = build_request(BenchConfig(workload="code-edit"), 3, "m")
    source = body["prediction"]["content"]
    assert body["prediction"]["type"] == "content" and source in body["messages"][0]["content"]
    assert 350 <= len(tokenizer.encode(source, add_special_tokens=False)) <= 450  # ~400 tokens, as documented
    assert "get_delta" in body["messages"][0]["content"].split("\n")[0]  # the line to change names one getter
    _, plain = build_request(BenchConfig(workload="code-edit", prediction=False), 3, "m")
    assert "prediction" not in plain and plain["messages"] == body["messages"]
    _, rewrite = build_request(BenchConfig(workload="rewrite", prompt_tokens=200), 0, "m")
    words = len(rewrite["messages"][0]["content"].split())
    assert "prediction" not in rewrite and 130 <= words * 1.3 <= 260


def test_responses_requests_and_their_events():
    path, body = build_request(BenchConfig(endpoint="responses", ignore_eos=True, max_tokens=9), 2, "m")
    assert path == "/responses" and body["input"] and body["max_output_tokens"] == 9 and body["ignore_eos"]
    assert "messages" not in body and "max_tokens" not in body and body["stream"]
    timer = StreamTimer(0.0)
    timer.feed('data: {"type":"response.created","sequence_number":0,"response":{}}', 0.1)
    timer.feed('data: {"type":"response.output_text.delta","delta":"Hi","sequence_number":1}', 0.2)
    timer.feed('data: {"type":"response.output_text.delta","delta":" there","sequence_number":2}', 0.3)
    timer.feed('data: {"type":"response.completed","sequence_number":3,"response":{"usage":'
               '{"input_tokens":12,"output_tokens":2}}}', 0.35)
    r = timer.finish(0.4)
    assert r.ttft == pytest.approx(0.2) and r.itls == [pytest.approx(0.1)]
    assert (r.prompt_tokens, r.completion_tokens, r.usage_reported) == (12, 2, True)


def test_config_from_namespace_dict_and_flags():
    args = parse(["--num-requests", "5", "-c", "2", "--eos-bias", "2", "--json-out", "x.json"])
    cfg = BenchConfig.from_any(args)
    assert (cfg.num_requests, cfg.concurrency, cfg.eos_bias, cfg.ignore_eos) == (5, 2, 2, False)
    assert BenchConfig.from_any({"max_tokens": 3, "unknown": 1}).max_tokens == 3


def test_summarize_and_tables():
    results = [
        RequestResult(ok=True, ttft=0.1, latency=1.0, itls=[0.01, 0.02], prompt_tokens=100,
                      completion_tokens=10),
        RequestResult(ok=True, ttft=0.2, latency=2.0, itls=[0.03], prompt_tokens=100, completion_tokens=10),
        RequestResult(error="HTTP 500: boom"),
    ]
    s = summarize(results, 4.0, BenchConfig(label="x", concurrency=2))
    assert s["requests_ok"] == 2 and s["requests_failed"] == 1 and s["errors"] == ["HTTP 500: boom"]
    assert s["output_tok_s"] == 5.0 and s["requests_s"] == 0.5
    assert s["ttft_p50_ms"] == pytest.approx(150.0) and s["itl_p50_ms"] == pytest.approx(20.0)
    assert s["latency_p99_s"] == pytest.approx(1.99)
    assert s["prefill_tok_s"] == pytest.approx(750.0)  # median of 100/0.1 and 100/0.2
    assert s["tpot_p50_ms"] == pytest.approx(150.0)  # median of 0.9/9 and 1.8/9
    table = markdown_table([s, s])
    lines = table.splitlines()
    assert len(lines) == 4 and "out tok/s" in lines[0] and "prefill tok/s" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    text = readable_summary(s)
    assert "2/3 ok" in text and "HTTP 500" in text
    assert summarize([], 0.0, BenchConfig())["output_tok_s"] == 0.0


def _fake_server(usage: bool, seen: list[dict]) -> httpx.MockTransport:
    """Streams 4 one-token chunks per request; without `usage`, answers unstreamed probes with it."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        seen.append(body)
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [],
                                             "usage": {"prompt_tokens": 42, "completion_tokens": 1}})
        lines = [_content(f"t{i}") for i in range(4)]
        if usage:
            lines.append(_usage(42, 4))
        lines.append("data: [DONE]")
        return httpx.Response(200, content="\n\n".join(lines).encode() + b"\n\n",
                              headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("usage", [True, False])
def test_run_benchmark_against_a_fake_server(usage: bool):
    seen: list[dict] = []
    cfg = BenchConfig(base_url="http://fake/v1", num_requests=6, concurrency=3, warmup=1, usage_probes=2)
    s = run_benchmark(cfg, transport=_fake_server(usage, seen))
    assert s["requests_ok"] == 6 and s["requests_failed"] == 0 and s["model"] == "fake-model"
    assert s["mean_output_tokens"] == 4 and s["mean_prompt_tokens"] == 42 and s["usage_reported"] is usage
    assert s["ttft_p50_ms"] > 0 and s["output_tok_s"] > 0 and s["prefill_tok_s"] > 0
    streamed = [b for b in seen if b.get("stream")]
    assert len(streamed) == 7  # 1 warmup + 6 timed
    assert len({b["messages"][0]["content"] for b in streamed}) == 7
    assert len(seen) - len(streamed) == (0 if usage else 2)  # probes only when the stream lacks usage


def test_run_benchmark_counts_http_errors():
    transport = httpx.MockTransport(lambda request: httpx.Response(503, text="overloaded"))
    cfg = BenchConfig(base_url="http://fake/v1", model="m", num_requests=3, concurrency=2, warmup=0)
    s = run_benchmark(cfg, transport=transport)
    assert s["requests_ok"] == 0 and s["requests_failed"] == 3 and s["errors"] == ["HTTP 503: overloaded"]


def test_a_closed_keep_alive_connection_is_retried_once():
    """llama-server closes idle kept-alive connections: a request that meets one before any answer is
    sent again; a server that keeps dropping it still counts as a failure."""
    inner, seen, calls = _fake_server(True, []), [], {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] % 2 == 0 and not request.url.path.endswith("/models"):
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        seen.append(request)
        return inner.handler(request)

    cfg = BenchConfig(base_url="http://fake/v1", model="m", num_requests=4, concurrency=1, warmup=0)
    s = run_benchmark(cfg, transport=httpx.MockTransport(flaky))
    assert s["requests_ok"] == 4 and s["requests_failed"] == 0 and len(seen) == 4

    def dead(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    s = run_benchmark(cfg, transport=httpx.MockTransport(dead))
    assert s["requests_failed"] == 4 and "RemoteProtocolError" in s["errors"][0]


def test_compare_prints_saved_runs(tmp_path, capsys):
    paths = []
    for name in ("a", "b"):
        s = summarize([RequestResult(ok=True, ttft=0.1, latency=1.0, completion_tokens=8)], 1.0,
                      BenchConfig(label=name))
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(s))
    assert bench.run(parse(["--compare", *map(str, paths)])) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[2].startswith("| a |") and out[3].startswith("| b |")


def test_run_against_a_real_server():
    with ember_server() as base:
        args = parse(["--base-url", f"{base}/v1", "--num-requests", "6", "--concurrency", "3",
                      "--max-tokens", "8", "--prompt-tokens", "30", "--ignore-eos", "--warmup", "0"])
        summary = run_benchmark(args)
    assert summary["requests_ok"] == 6 and summary["requests_failed"] == 0, summary["errors"]
    assert summary["mean_output_tokens"] == 8 and summary["usage_reported"]
    assert summary["output_tok_s"] > 0 and 0 < summary["ttft_p50_ms"] <= summary["ttft_p99_ms"]
    assert summary["itl_p50_ms"] > 0 and summary["prefill_tok_s"] > 0
    assert "out tok/s" in markdown_table([summary])
