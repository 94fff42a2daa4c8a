"""Load generator for any OpenAI-compatible server: N streamed requests at concurrency C.

Reports output tok/s, requests/s, time to first token, inter-token latency and end-to-end latency
percentiles, plus prefill tok/s (prompt tokens / TTFT). `--compare` prints saved runs side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_WORDS = ("river mountain carbon quantum violet harbor lantern meadow circuit falcon granite ember orchard "
          "signal cobalt willow pepper saddle thunder marble copper lattice beacon tundra canyon whisper "
          "galaxy prism walnut compass anchor glacier velvet mosaic cipher harvest nebula timber").split()


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_sse_line(line: str) -> dict | None:
    """The JSON of a `data:` line; None for blank lines, comments and the [DONE] sentinel."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)


def make_prompt(index: int, approx_tokens: int, seed: int = 0) -> str:
    """Distinct from its first word on, so a prefix cache cannot serve one request from another.

    Sized for SmolLM2's tokenizer and chat template: ~1.16 tokens a word plus ~35 of template.
    """
    rng = random.Random(seed * 1_000_003 + index)
    words = [rng.choice(_WORDS) for _ in range(max(1, round((approx_tokens - 35) / 1.16)))]
    return f"{index} {rng.random():.6f}: " + " ".join(words) + ". Continue this list."


def chunk_text(chunk: dict) -> str:
    out = ""
    for choice in chunk.get("choices") or []:
        out += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return out


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, index: int) -> RequestResult:
    prompt = make_prompt(index, args.prompt_tokens, args.seed)
    body: dict = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.eos_bias is not None:
        body["logit_bias"] = {str(args.eos_bias): -100}
    body.update(json.loads(args.extra_body) if args.extra_body else {})
    path = "/chat/completions" if args.endpoint == "chat" else "/completions"
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", args.base_url.rstrip("/") + path, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                now = time.perf_counter()
                if chunk_text(chunk):
                    chunks += 1
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.completion_tokens = chunk["usage"].get("completion_tokens", 0)
    except httpx.HTTPError as exc:
        result.error = repr(exc)
        return result
    result.latency = time.perf_counter() - start
    result.completion_tokens = result.completion_tokens or chunks
    if result.ttft == 0.0:
        result.ttft = result.latency
    result.ok = True
    return result


async def _run(args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        for i in range(args.warmup):
            await one_request(client, args, -1 - i)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.num_requests):
            queue.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, args, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], wall: float, label: str, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    out_tokens = sum(r.completion_tokens for r in ok)
    prefill = [r.prompt_tokens / r.ttft for r in ok if r.ttft > 0 and r.prompt_tokens]
    ms = 1000.0
    return {
        "label": label, "concurrency": concurrency, "requests_ok": len(ok), "requests_failed": len(results) - len(ok),
        "wall_s": round(wall, 3), "output_tok_s": round(out_tokens / wall, 2) if wall else 0.0,
        "requests_s": round(len(ok) / wall, 3) if wall else 0.0,
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else 0,
        "mean_output_tokens": round(out_tokens / len(ok), 1) if ok else 0,
        "ttft_p50_ms": round(percentile([r.ttft for r in ok], 50) * ms, 1),
        "ttft_p90_ms": round(percentile([r.ttft for r in ok], 90) * ms, 1),
        "ttft_p99_ms": round(percentile([r.ttft for r in ok], 99) * ms, 1),
        "itl_p50_ms": round(percentile(itls, 50) * ms, 1), "itl_p90_ms": round(percentile(itls, 90) * ms, 1),
        "itl_p99_ms": round(percentile(itls, 99) * ms, 1),
        "latency_p50_s": round(percentile([r.latency for r in ok], 50), 3),
        "latency_p99_s": round(percentile([r.latency for r in ok], 99), 3),
        "prefill_tok_s": round(percentile(prefill, 50), 1),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


COLUMNS = [("label", "server"), ("concurrency", "conc"), ("requests_ok", "ok"), ("output_tok_s", "out tok/s"),
           ("requests_s", "req/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
           ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"), ("latency_p50_s", "lat p50 s"),
           ("latency_p99_s", "lat p99 s"), ("prefill_tok_s", "prefill tok/s")]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(str(r.get(key, "")) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def run_benchmark(args: argparse.Namespace) -> dict:
    results, wall = asyncio.run(_run(args))
    return summarize(results, wall, args.label or args.base_url, args.concurrency)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=100, help="approximate prompt length")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (Ember, vLLM)")
    parser.add_argument("--eos-bias", type=int, default=None,
                        help="send logit_bias {ID: -100} instead, for servers without ignore_eos")
    parser.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--label", default=None)
    parser.add_argument("--json-out", default=None, help="save the summary here")
    parser.add_argument("--compare", nargs="+", default=None, help="print saved summaries side by side and exit")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        print(markdown_table([json.loads(Path(p).read_text()) for p in args.compare]))
        return 0
    summary = run_benchmark(args)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    print(markdown_table([summary]))
    if summary["requests_failed"]:
        print(f"failures: {summary['errors']}", file=sys.stderr)
    return 0 if summary["requests_ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
