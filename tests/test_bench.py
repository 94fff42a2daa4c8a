"""The load generator: its statistics, and one real run against a server."""

from __future__ import annotations

import argparse

from ember.bench import add_arguments, make_prompt, markdown_table, parse_sse_line, percentile, run_benchmark
from tests.server import ember_server


def test_percentile():
    assert percentile([], 50) == 0.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([5, 1, 3], 0) == 1 and percentile([5, 1, 3], 100) == 5


def test_parse_sse_line():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None


def test_prompts_differ_from_the_first_word():
    prompts = [make_prompt(i, 100) for i in range(20)]
    assert len({p.split()[0] for p in prompts}) == 20
    assert make_prompt(3, 100) == make_prompt(3, 100)


def test_run_against_a_real_server():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with ember_server() as base:
        args = parser.parse_args(["--base-url", f"{base}/v1", "--num-requests", "6", "--concurrency", "3",
                                  "--max-tokens", "8", "--prompt-tokens", "30", "--ignore-eos", "--warmup", "0"])
        summary = run_benchmark(args)
    assert summary["requests_ok"] == 6 and summary["requests_failed"] == 0, summary["errors"]
    assert summary["mean_output_tokens"] == 8
    assert summary["output_tok_s"] > 0 and 0 < summary["ttft_p50_ms"] <= summary["ttft_p99_ms"]
    assert summary["itl_p50_ms"] > 0 and summary["prefill_tok_s"] > 0
    assert "out tok/s" in markdown_table([summary])
