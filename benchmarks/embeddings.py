"""Embeddings per second for N short sentences (default 1,000): a running `ember serve` (its encoder model)
through the openai SDK (requests of --batch inputs, --concurrency at once) against the reference computed in
this process on the same CPU: transformers' AutoModel on the same folder, batches of --batch, mean pooling and
normalization as sentence-transformers defines them (sentence-transformers itself needs scipy, not installed).
Run it on a quiet machine; the server and the reference take turns, never overlap.
    usage: .venv/bin/python benchmarks/embeddings.py [--url http://127.0.0.1:8001] [-n 1000] [--batch 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

import openai
import torch
from transformers import AutoModel, AutoTokenizer

from ember.models.loader import minilm_model_path

WORDS = ("the a river city small quiet engine light morning winter bright garden station over under near runs "
         "holds finds keeps old new green cold warm long short road bridge market window letter song").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Short sentences of 6 to 20 words, different for each seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))).capitalize() + "." for _ in range(n)]


async def ember(url: str, texts: list[str], batch: int, concurrency: int) -> float:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    # the served encoder (a chat model embeds too, but this compares with the encoder's reference)
    model = next(m.id for m in (await client.models.list()).data if m.model_extra["capabilities"] == ["embeddings"])
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    await client.embeddings.create(model=model, input=chunks[0])  # warm-up
    gate = asyncio.Semaphore(concurrency)

    async def one(chunk: list[str]) -> None:
        async with gate:
            await client.embeddings.create(model=model, input=chunk)

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in chunks))
    return len(texts) / (time.perf_counter() - start)


def reference(texts: list[str], batch: int) -> float:
    folder = str(minilm_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    def run(chunk: list[str]) -> torch.Tensor:
        features = tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**features).last_hidden_state
        mask = features["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    with torch.inference_mode():
        run(texts[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            run(texts[i:i + batch])
        return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8001")
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    served = asyncio.run(ember(args.url, sentences(args.n, 1), args.batch, args.concurrency))
    ref = reference(sentences(args.n, 2), args.batch)
    print(f"{args.n} sentences: Ember {served:.1f} embeddings/s, reference (transformers, batch {args.batch}) "
          f"{ref:.1f}/s: {served / ref:.2f}x")


if __name__ == "__main__":
    main()
