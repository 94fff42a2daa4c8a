"""Load generator for any OpenAI-compatible server: N streamed requests at concurrency C.

Reports output tok/s, requests/s, time to first token (TTFT), inter-token latency (ITL) and
end-to-end latency percentiles, plus prefill tok/s (prompt tokens / TTFT: run it with
`--prompt-tokens 512 --max-tokens 1 --concurrency 1`). `--compare a.json b.json ...` prints saved
runs side by side. From Python: `run_benchmark(BenchConfig(...))` returns the summary dict.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_WORDS = ("river mountain carbon quantum violet harbor lantern meadow circuit falcon granite ember orchard "
          "signal cobalt willow pepper saddle thunder marble copper lattice beacon tundra canyon whisper "
          "galaxy prism walnut compass anchor glacier velvet mosaic cipher harvest nebula timber").split()


# what `--sampling-mix` sends, request i getting entry i % len: every sampler path in one batch
MIXED_SAMPLING: list[dict[str, Any]] = [
    {"temperature": 0},
    {"temperature": 0.8, "top_k": 40},
    {"temperature": 0.7, "min_p": 0.05},
    {"temperature": 1.0, "typical_p": 0.9},
    {"temperature": 1.0, "mirostat_target": 5.0, "mirostat_lr": 0.1},
    {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.3},
    {"temperature": 0.7, "logit_bias": {"28": 2.0}, "logprobs": True, "top_logprobs": 5},
    {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 7},
]


@dataclass
class BenchConfig:
    """One benchmark run; every field is also a `--kebab-case` flag."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # None: the first id that GET /models lists
    num_requests: int = 32
    concurrency: int = 16
    max_tokens: int = 64
    prompt_tokens: int = 100
    endpoint: str = "chat"  # chat | completions | responses
    temperature: float = 0.0
    sampling_mix: bool = False  # cycle requests through MIXED_SAMPLING instead of one temperature
    ignore_eos: bool = False
    eos_bias: int | None = None
    extra_body: dict[str, Any] | str | None = None
    warmup: int = 2
    seed: int = 0
    timeout: float = 600.0
    label: str | None = None
    usage_probes: int = 16
    workload: str = "random"  # random | code-edit | rewrite (see WORKLOADS)
    prediction: bool = True  # code-edit: send the original file as `prediction`

    @classmethod
    def from_any(cls, config: BenchConfig | argparse.Namespace | dict) -> BenchConfig:
        """A BenchConfig from itself, parsed flags, or a dict (unknown keys are ignored)."""
        if isinstance(config, BenchConfig):
            return config
        values = vars(config) if isinstance(config, argparse.Namespace) else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def extra(self) -> dict[str, Any]:
        """--extra-body as a dict (it may be given as a JSON string)."""
        if not self.extra_body:
            return {}
        extra = json.loads(self.extra_body) if isinstance(self.extra_body, str) else self.extra_body
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        return extra


@dataclass
class RequestResult:
    """What one streamed request measured (seconds from the moment it was sent)."""

    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted_prediction_tokens: int = 0  # from usage.completion_tokens_details, where the server reports it
    usage_reported: bool = False
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile (q in [0, 100]), as numpy's default; 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_sse_line(line: str) -> dict | None:
    """The JSON of a `data:` line; None for blank lines, comments, other fields and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)


def chunk_text(chunk: dict) -> str:
    """The generated text in one streamed chunk (chat `delta.content`, completions `text`, or a Responses
    `response.output_text.delta` event)."""
    if chunk.get("type") == "response.output_text.delta":
        return chunk.get("delta") or ""
    out = ""
    for choice in chunk.get("choices") or []:
        out += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return out


def make_prompt(index: int, approx_tokens: int, seed: int = 0) -> str:
    """Distinct from its first word on, so a prefix cache cannot serve one request from another.

    Sized for SmolLM2's tokenizer and chat template: ~1.05 tokens a word plus ~45 for the numbered
    prefix and the template (100 -> ~103 prompt tokens, 512 -> ~512).
    """
    rng = random.Random(seed * 1_000_003 + index)
    words = [rng.choice(_WORDS) for _ in range(max(1, round((approx_tokens - 45) / 1.05)))]
    return f"{index} {rng.random():.6f}: " + " ".join(words) + ". Continue this list."


_NAMES = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega orion vega lyra draco hydra "
          "cygnus perseus").split()


def make_source_file(index: int, seed: int = 0) -> str:
    """A ~400-token Python module of small getters with random defaults (SmolLM2 tokens)."""
    rng = random.Random(seed * 1_000_003 + index)
    return "\n".join(f"def get_{name}(config):\n    return config.get(\"{name}\", {rng.randint(1, 99)})\n"
                     for name in _NAMES[:18])


def make_passage(index: int, approx_tokens: int, seed: int = 0) -> str:
    """Plain sentences (~1.3 SmolLM2 tokens a word) to repeat or lightly rewrite."""
    rng = random.Random(seed * 1_000_003 + index)
    sentences = []
    while sum(len(s.split()) for s in sentences) * 1.3 < approx_tokens:
        a, b, c = (rng.choice(_WORDS) for _ in range(3))
        sentences.append(f"The {a} near the {b} was as quiet as the {c}.")
    return " ".join(sentences)


# what each --workload asks: "random" is make_prompt's word list; "code-edit" asks for a one-line change to a
# source file and (with --prediction) sends the original as the prediction, as an editor would; "rewrite"
# asks for a passage back nearly unchanged, where prompt lookup drafts from the prompt
WORKLOADS = ("random", "code-edit", "rewrite")


def workload_prompt(config: BenchConfig, index: int) -> tuple[str, str | None]:
    """The prompt text of request `index` and the prediction to send with it, if any."""
    if config.workload == "code-edit":
        source = make_source_file(index, config.seed)
        name = _NAMES[index % 18]
        prompt = (f"Change the default of get_{name} to 100 in this code. Reply with the full code only."
                  f"\n\n```python\n{source}```")
        return prompt, source if config.prediction else None
    if config.workload == "rewrite":
        passage = make_passage(index, config.prompt_tokens, config.seed)
        return f"Repeat this text, fixing any typos, and nothing else:\n\n{passage}", None
    return make_prompt(index, config.prompt_tokens, config.seed), None


def build_request(config: BenchConfig, index: int, model: str) -> tuple[str, dict]:
    """The URL path and JSON body of request `index` (streamed, with usage in the last chunk)."""
    prompt, prediction = workload_prompt(config, index)
    body: dict[str, Any] = {"model": model, "max_tokens": config.max_tokens,
                            "temperature": config.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if config.sampling_mix:
        body.update(MIXED_SAMPLING[index % len(MIXED_SAMPLING)])
    if config.endpoint == "responses":  # the same request in the Responses API's names
        body = {"model": model, "input": prompt, "max_output_tokens": config.max_tokens,
                "temperature": config.temperature, "stream": True, "store": False}
        path = "/responses"
    elif config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/completions"
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.eos_bias is not None:
        body["logit_bias"] = {str(config.eos_bias): -100}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    body.update(config.extra())
    return path, body


def _responses_usage(chunk: dict) -> dict | None:
    """A Responses stream's usage, from its last event, in chat's names."""
    if chunk.get("type") not in ("response.completed", "response.incomplete"):
        return None
    usage = (chunk.get("response") or {}).get("usage") or {}
    return {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}


class StreamTimer:
    """Turns SSE lines, each with the time it arrived, into a RequestResult."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last: float | None = None
        self.chunks = 0
        self.result = RequestResult()

    def feed(self, line: str, now: float) -> None:
        """One line of the stream; raises ValueError for an error event or malformed JSON."""
        chunk = parse_sse_line(line)
        if chunk is None:
            return
        if chunk.get("error"):
            raise ValueError(f"error event: {json.dumps(chunk['error'])[:200]}")
        if chunk_text(chunk):
            self.chunks += 1
            if self.last is None:
                self.result.ttft = now - self.start
            else:
                self.result.itls.append(now - self.last)
            self.last = now
        usage = chunk.get("usage") or _responses_usage(chunk)
        if usage:
            self.result.usage_reported = True
            self.result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.result.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("completion_tokens_details") or {}
            self.result.accepted_prediction_tokens = int(details.get("accepted_prediction_tokens") or 0)

    def finish(self, now: float) -> RequestResult:
        """The result once the stream ended at `now`: token count from usage, else from chunks."""
        r = self.result
        r.latency = now - self.start
        r.completion_tokens = r.completion_tokens or self.chunks
        if self.last is None:  # nothing generated (e.g. an immediate EOS): first token = end
            r.ttft = r.latency
        r.ok = True
        return r


class _StaleConnection(Exception):
    """The server closed a kept-alive connection before answering (llama-server closes idle ones)."""


async def _timed_stream(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    timer, answered = StreamTimer(time.perf_counter()), False
    try:
        async with client.stream("POST", url, json=body) as resp:
            answered = True
            if resp.status_code != 200:
                text = (await resp.aread())[:200].decode(errors="replace")
                return RequestResult(error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                timer.feed(line, time.perf_counter())
    except httpx.RemoteProtocolError as exc:
        if not answered:
            raise _StaleConnection(str(exc)) from exc
        return RequestResult(error=f"{type(exc).__name__}: {exc}"[:300])
    except (httpx.HTTPError, ValueError) as exc:
        return RequestResult(error=f"{type(exc).__name__}: {exc}"[:300])
    return timer.finish(time.perf_counter())


async def one_request(client: httpx.AsyncClient, config: BenchConfig, index: int,
                      model: str) -> RequestResult:
    """Send request `index` and time its stream; sent once more if it met a stale connection."""
    path, body = build_request(config, index, model)
    url = config.base_url.rstrip("/") + path
    for _ in range(2):
        try:
            return await _timed_stream(client, url, body)
        except _StaleConnection as exc:
            error = f"RemoteProtocolError: {exc}"[:300]
    return RequestResult(error=error)


async def probe_prompt_tokens(client: httpx.AsyncClient, config: BenchConfig, index: int, model: str) -> int:
    """prompt_tokens of request `index` from an unstreamed 1-token twin (for servers whose streams
    carry no usage); 0 if the server does not say."""
    path, body = build_request(config, index, model)
    body.update(stream=False, max_tokens=1)
    body.pop("stream_options", None)
    try:
        resp = await client.post(config.base_url.rstrip("/") + path, json=body)
        return int(((resp.json() or {}).get("usage") or {}).get("prompt_tokens") or 0)
    except (httpx.HTTPError, ValueError, AttributeError):
        return 0


async def resolve_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    """--model, else the first model the server lists, else "default"."""
    if config.model:
        return config.model
    try:
        data = (await client.get(config.base_url.rstrip("/") + "/models")).json().get("data") or []
        return data[0]["id"] if data else "default"
    except (httpx.HTTPError, ValueError, KeyError, AttributeError):
        return "default"


async def run_requests(config: BenchConfig, transport: httpx.AsyncBaseTransport | None = None,
                       ) -> tuple[list[RequestResult], float, str]:
    """Warm up, then run the timed requests; their results, the wall time and the model name."""
    n = config.concurrency + 4
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    timeout = httpx.Timeout(config.timeout)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as client:
        model = await resolve_model(client, config)
        await asyncio.gather(*(one_request(client, config, -1 - i, model) for i in range(config.warmup)))
        pending = list(range(config.num_requests))[::-1]
        results: list[RequestResult | None] = [None] * config.num_requests

        async def worker() -> None:
            while pending:
                i = pending.pop()
                results[i] = await one_request(client, config, i, model)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, config.concurrency))))
        wall = time.perf_counter() - start
        done = [r for r in results if r is not None]
        await fill_prompt_tokens(client, config, done, model)
        return done, wall, model


async def fill_prompt_tokens(client: httpx.AsyncClient, config: BenchConfig, results: list[RequestResult],
                             model: str) -> None:
    """Servers that stream no usage (llama-cpp-python) get their prompt sizes asked afterwards, off the
    clock: up to `usage_probes` requests exactly, the rest at the mean of those."""
    missing = [i for i, r in enumerate(results) if r.ok and not r.prompt_tokens]
    if not missing or config.usage_probes <= 0:
        return
    probed = missing[:config.usage_probes]
    counts = [await probe_prompt_tokens(client, config, i, model) for i in probed]
    for i, n in zip(probed, counts, strict=True):
        results[i].prompt_tokens = n
    known = [n for n in counts if n]
    if known:
        mean = round(sum(known) / len(known))
        for i in missing[config.usage_probes:]:
            results[i].prompt_tokens = mean


def summarize(results: list[RequestResult], wall: float, config: BenchConfig, model: str = "") -> dict:
    """The JSON summary of one run (times in ms, latencies in s)."""
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    prefill = [r.prompt_tokens / r.ttft for r in ok if r.ttft > 0 and r.prompt_tokens]
    tpots = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    ms = 1000.0

    def pct(values: list[float], q: float, scale: float = ms, digits: int = 1) -> float:
        return round(percentile(values, q) * scale, digits)

    return {
        "label": config.label or config.base_url, "base_url": config.base_url, "model": model,
        "endpoint": config.endpoint, "concurrency": config.concurrency, "num_requests": config.num_requests,
        "max_tokens": config.max_tokens, "prompt_tokens_target": config.prompt_tokens,
        "workload": config.workload,
        "accepted_prediction_tokens": sum(r.accepted_prediction_tokens for r in ok),
        "ignore_eos": config.ignore_eos, "eos_bias": config.eos_bias,
        "requests_ok": len(ok), "requests_failed": len(results) - len(ok),
        "wall_s": round(wall, 3), "output_tok_s": round(out_tokens / wall, 2) if wall else 0.0,
        "requests_s": round(len(ok) / wall, 3) if wall else 0.0,
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else 0,
        "mean_output_tokens": round(out_tokens / len(ok), 1) if ok else 0,
        "usage_reported": bool(ok) and all(r.usage_reported for r in ok),
        "ttft_p50_ms": pct(ttfts, 50), "ttft_p90_ms": pct(ttfts, 90), "ttft_p99_ms": pct(ttfts, 99),
        "itl_p50_ms": pct(itls, 50), "itl_p90_ms": pct(itls, 90), "itl_p99_ms": pct(itls, 99),
        "tpot_p50_ms": pct(tpots, 50),
        "latency_p50_s": pct([r.latency for r in ok], 50, 1.0, 3),
        "latency_p99_s": pct([r.latency for r in ok], 99, 1.0, 3),
        "prefill_tok_s": round(percentile(prefill, 50), 1),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


COLUMNS = [("label", "server"), ("concurrency", "conc"), ("requests_ok", "ok"), ("requests_failed", "fail"),
           ("mean_prompt_tokens", "prompt tok"), ("mean_output_tokens", "out tok"),
           ("output_tok_s", "out tok/s"), ("requests_s", "req/s"),
           ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p90_ms", "TTFT p90 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
           ("itl_p50_ms", "ITL p50 ms"), ("itl_p90_ms", "ITL p90 ms"), ("itl_p99_ms", "ITL p99 ms"),
           ("latency_p50_s", "lat p50 s"), ("latency_p99_s", "lat p99 s"), ("prefill_tok_s", "prefill tok/s")]


def markdown_header() -> str:
    """The header and rule lines of the results table."""
    return "| " + " | ".join(title for _, title in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def markdown_row(summary: dict) -> str:
    """One summary as one table row."""
    return "| " + " | ".join(str(summary.get(key, "")) for key, _ in COLUMNS) + " |"


def markdown_table(rows: list[dict]) -> str:
    """Summaries side by side, one row each."""
    return "\n".join([markdown_header(), *(markdown_row(r) for r in rows)])


def readable_summary(s: dict) -> str:
    """A few lines for people."""
    eos = ""
    if s.get("ignore_eos"):
        eos = " ignore_eos"
    elif s.get("eos_bias") is not None:
        eos = f" eos-bias {s['eos_bias']}"
    lines = [
        f"{s['label']}: {s['requests_ok']}/{s['requests_ok'] + s['requests_failed']} ok in {s['wall_s']} s "
        f"({s.get('endpoint', '?')}, concurrency {s['concurrency']}, ~{s['mean_prompt_tokens']} prompt tok, "
        f"~{s['mean_output_tokens']} out tok{eos})",
        f"  throughput  {s['output_tok_s']} out tok/s, {s['requests_s']} req/s",
        f"  TTFT        p50 {s['ttft_p50_ms']} / p90 {s['ttft_p90_ms']} / p99 {s['ttft_p99_ms']} ms",
        f"  ITL         p50 {s['itl_p50_ms']} / p90 {s['itl_p90_ms']} / p99 {s['itl_p99_ms']} ms"
        f" (TPOT p50 {s.get('tpot_p50_ms', 0)} ms)",
        f"  latency     p50 {s['latency_p50_s']} / p99 {s['latency_p99_s']} s",
        f"  prefill     {s['prefill_tok_s']} tok/s (prompt tokens / TTFT, p50)",
    ]
    if not s.get("usage_reported", True) and s["requests_ok"]:
        lines.append("  (the stream carried no usage: output tokens counted as chunks, prompt tokens probed)")
    if s["requests_failed"]:
        lines.append(f"  errors: {s['errors']}")
    return "\n".join(lines)


def run_benchmark(config: BenchConfig | argparse.Namespace | dict,
                  transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Run one benchmark and return its summary (see `summarize`)."""
    cfg = BenchConfig.from_any(config)
    results, wall, model = asyncio.run(run_requests(cfg, transport))
    return summarize(results, wall, cfg, model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ember bench` flags."""
    d = BenchConfig()
    a = parser.add_argument
    a("--base-url", default=d.base_url, help="OpenAI-compatible base URL (default %(default)s)")
    a("--model", default=None, help="model name to send (default: the first one GET /models lists)")
    a("--num-requests", "-n", type=int, default=d.num_requests, help="timed requests (default %(default)s)")
    a("--concurrency", "-c", type=int, default=d.concurrency, help="requests in flight (default %(default)s)")
    a("--max-tokens", type=int, default=d.max_tokens, help="output tokens a request (default %(default)s)")
    a("--prompt-tokens", type=int, default=d.prompt_tokens,
      help="approximate prompt length in SmolLM2 tokens, template included (default %(default)s)")
    a("--endpoint", choices=["chat", "completions", "responses"], default=d.endpoint,
      help="responses: the same requests through POST /v1/responses (typed events; no --ignore-eos, "
           "--eos-bias or --sampling-mix there)")
    a("--temperature", type=float, default=d.temperature, help="(default %(default)s)")
    a("--sampling-mix", action="store_true",
      help="cycle requests through greedy, top-k, min-p, typical-p, Mirostat, penalties, logit_bias "
           "and logprobs (overrides --temperature)")
    a("--ignore-eos", action="store_true", help="send ignore_eos: true (Ember, vLLM)")
    a("--eos-bias", type=int, default=None, metavar="TOKEN_ID",
      help="send logit_bias {TOKEN_ID: -100} instead, for servers without ignore_eos")
    a("--workload", choices=WORKLOADS, default=d.workload,
      help="random word lists; code-edit: a one-line change to a ~400-token file, the original sent as "
           "`prediction`; rewrite: a passage to repeat (prompt lookup's case) (default %(default)s)")
    a("--no-prediction", dest="prediction", action="store_false",
      help="code-edit without the `prediction` field, the baseline it speeds up")
    a("--extra-body", default=None, metavar="JSON", help="JSON object merged into every request body")
    a("--warmup", type=int, default=d.warmup, help="untimed requests first (default %(default)s)")
    a("--seed", type=int, default=d.seed, help="prompt text seed (default %(default)s)")
    a("--timeout", type=float, default=d.timeout, help="seconds per request (default %(default)s)")
    a("--usage-probes", type=int, default=d.usage_probes,
      help="if streams carry no usage, ask this many prompts' sizes afterwards, untimed "
           "(default %(default)s)")
    a("--label", default=None, help="name of this run in tables (default: the base URL)")
    a("--json-out", default=None, metavar="FILE", help="save the summary as JSON")
    a("--compare", nargs="+", default=None, metavar="JSON",
      help="print saved summaries side by side and exit")


def run(args: argparse.Namespace) -> int:
    """`ember bench`: 0 if any request succeeded (or the comparison printed), else 1."""
    if args.compare:
        print(markdown_table([json.loads(Path(p).read_text()) for p in args.compare]))
        return 0
    summary = run_benchmark(args)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    print(readable_summary(summary))
    print(markdown_table([summary]))
    return 0 if summary["requests_ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m ember.bench`."""
    parser = argparse.ArgumentParser(prog="python -m ember.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
