"""Batch jobs beside live traffic, on one running `ember serve` (each run gets prompts of its own, so that no
run is served from the prefix cache another filled):

1. throughput: a job of N lines (default 1,000) vs the same kind of requests sent live at concurrency 16, in
   output tokens/s (the job from its creation to its completion, validation and output files included);
2. live latency: streamed chat requests at concurrency 1 on an idle server, then while a job of N lines runs:
   TTFT and latency p50 / p90.

Ratios print at the end; the JSON lands in benchmarks/results/batch.json.
    usage: .venv/bin/python benchmarks/batch.py [--url http://127.0.0.1:8000] [--lines 1000] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import httpx

from ember.bench import BenchConfig, build_request, run_benchmark

RESULTS = Path(__file__).parent / "results"


def job(url: str, config: BenchConfig, model: str) -> dict:
    """Upload N lines (the bench's requests, unstreamed) as a batch and wait for it: its wall time and tokens."""
    lines = []
    for i in range(config.num_requests):
        _, body = build_request(config, i, model)
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        lines.append(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as client:
        file = client.post("/files", files={"file": ("bench.jsonl", "\n".join(lines).encode())},
                           data={"purpose": "batch"}).json()
        start = time.perf_counter()
        batch = client.post("/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"}).json()
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.1)
            batch = client.get(f"/batches/{batch['id']}").json()
        wall = time.perf_counter() - start
    usage = batch["usage"]
    return {"status": batch["status"], "lines": config.num_requests, "completed": batch["request_counts"]["completed"],
            "wall_s": round(wall, 2), "output_tokens": usage["output_tokens"],
            "output_tok_s": round(usage["output_tokens"] / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--live-requests", type=int, default=40, help="latency samples, idle and under a job")
    args = parser.parse_args()
    model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    common = {"base_url": f"{args.url}/v1", "model": model, "max_tokens": args.max_tokens, "ignore_eos": True,
              "prompt_tokens": 100}
    report: dict = {}
    report["live_c16"] = run_benchmark({**common, "concurrency": 16, "num_requests": args.lines, "seed": 1,
                                        "label": "live c=16"})
    report["job"] = job(args.url, BenchConfig(**common, num_requests=args.lines, seed=2), model)
    latency = {**common, "concurrency": 1, "num_requests": args.live_requests, "warmup": 1}
    report["idle"] = run_benchmark({**latency, "seed": 3, "label": "idle"})
    background: dict = {}
    worker = threading.Thread(target=lambda: background.update(
        job(args.url, BenchConfig(**common, num_requests=args.lines, seed=4), model)))
    worker.start()
    time.sleep(2.0)  # the job is validated and running
    report["under_job"] = run_benchmark({**latency, "seed": 5, "label": "under a job"})
    worker.join()
    report["background_job"] = background
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps(report, indent=2))
    live, done, idle, busy = report["live_c16"], report["job"], report["idle"], report["under_job"]
    print(f"throughput: job {done['output_tok_s']} tok/s ({done['lines']} lines, {done['wall_s']} s) vs live c=16 "
          f"{live['output_tok_s']} tok/s: {done['output_tok_s'] / live['output_tok_s']:.2f}x")
    for key in ("ttft_p50_ms", "ttft_p90_ms", "latency_p50_s"):
        print(f"live {key}: idle {idle[key]} vs under a job {busy[key]}: {busy[key] / idle[key]:.2f}x")
    print(f"background job: {background.get('output_tok_s')} tok/s while serving live requests")


if __name__ == "__main__":
    main()
