"""TTFT of a request whose long prefix is in the prefix cache against the same request cold, on a running
server: each round sends a fresh ~2,000-token prompt (cold: nothing of it cached), then the same prompt
with a new question (its prefix cached), streaming one token, and reports both medians and their ratio.

    .venv/bin/python benchmarks/prefix_cache.py [--base-url http://127.0.0.1:8000/v1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from ember.bench import make_prompt


def ttft(client: httpx.Client, url: str, model: str, document: str, question: str) -> tuple[float, int, int]:
    body = {"model": model, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"{document}\n\n{question}"}]}
    start = time.perf_counter()
    first, usage = None, {}
    with client.stream("POST", f"{url}/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                choices = event.get("choices") or [{}]
                if choices[0].get("finish_reason") or choices[0].get("delta", {}).get("content"):
                    first = first or time.perf_counter()  # the first token (not the role's opening chunk)
                usage = event.get("usage") or usage
    return first - start, usage.get("prompt_tokens", 0), usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    args = parser.parse_args()
    cold, cached = [], []
    with httpx.Client(timeout=300) as client:
        for i in range(args.rounds):
            document = make_prompt(int(time.time() * 1000) + i, args.prompt_tokens)
            seconds, tokens, hit = ttft(client, args.base_url, args.model, document, "Summarize it.")
            cold.append(seconds)
            seconds, tokens, hit = ttft(client, args.base_url, args.model, document, "List its first words.")
            cached.append(seconds)
            print(f"round {i}: {tokens} prompt tokens, cold {cold[-1] * 1e3:.0f} ms, "
                  f"cached ({hit} tokens hit) {cached[-1] * 1e3:.0f} ms", flush=True)
    c, h = statistics.median(cold), statistics.median(cached)
    print(f"TTFT p50: cold {c * 1e3:.0f} ms, cached prefix {h * 1e3:.0f} ms = {100 * h / c:.1f} % of cold")


if __name__ == "__main__":
    main()
