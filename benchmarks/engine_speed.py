"""The engine alone (no HTTP): one stream's decode speed and a 512-token prefill on a GGUF, for comparing
with `llama-bench -p 512 -n 32` on the same file in the same minute.

    .venv/bin/python benchmarks/engine_speed.py [GGUF]     # default: the bundled model
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from ember.engine.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.engine.request import SamplingParams
from ember.models.loader import load_weights


def step_times(engine: LLMEngine, rng: random.Random, prompt_len: int, max_tokens: int) -> list[float]:
    """Seconds per output token of each step (a step with accepted drafts yields several)."""
    prompt = [rng.randrange(1000, 40000) for _ in range(prompt_len)]  # random ids: no prefix-cache hit
    engine.add_request(f"r{rng.random()}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                   ignore_eos=True))
    times = []
    while engine.has_work():
        start = time.perf_counter()
        tokens = sum(len(out.token_ids) for out in engine.step())
        times.append((time.perf_counter() - start) / max(tokens, 1))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", nargs="?", default=None)
    parser.add_argument("--speculation", default="off", help="prompt-lookup drafts too (default: off, plain decode)")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.gguf, speculation=args.speculation),
                       load_weights(args.gguf, packed=True), [])
    rng = random.Random(0)
    step_times(engine, rng, 16, 4)  # warm up
    decode = statistics.median(step_times(engine, rng, 16, 33)[1:])  # the first step is the prefill
    prefill = sum(step_times(engine, rng, 512, 1))
    print(f"decode, one stream: {decode * 1e3:.1f} ms/token = {1 / decode:.1f} tok/s")
    print(f"prefill, 512 tokens: {prefill * 1e3:.0f} ms = {512 / prefill:.0f} tok/s")


if __name__ == "__main__":
    main()
