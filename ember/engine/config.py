"""Engine configuration: one dataclass, filled from CLI flags or EMBER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str | None = None  # GGUF file or Hugging Face folder; None = the bundled SmolLM2
    device: str = "auto"  # "auto" picks cuda when available
    dtype: str = "auto"  # activations and KV cache: "auto" = float32 on CPU, bfloat16 on CUDA
    # "quantized" keeps GGUF blocks packed (CPU kernels; "auto" on CPU); float32 / bfloat16 / float16
    # dequantize at load ("auto" on CUDA: bfloat16)
    weights: str = "auto"
    threads: int | None = None  # CPU threads (the kernel pool with quantized weights, else torch); None = the cores
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_mb: int = 512  # budget that sizes the number of KV blocks
    num_kv_blocks: int | None = None  # overrides the memory budget (tests use tiny caches)
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 512  # tokens per forward pass (prefill chunk budget)
    max_model_len: int | None = None  # defaults to the model's context length
    enable_prefix_caching: bool = True
    # a sliding-window model's window layers keep only the blocks their window reads (ember.engine.block_manager)
    sliding_window_kv: bool = True
    seed: int = 0  # base for requests without a seed
    # "prompt-lookup": drafts from each request's own context where they pay (ember.engine.spec); "off": none
    # (a request's prediction still drafts)
    speculation: str = "prompt-lookup"
    max_draft_tokens: int = 16  # drafts per sequence and step, at most (Fireworks' draftTokenCount)
    ngram_max: int = 4  # the longest context suffix prompt lookup matches (Fireworks' ngramSpeculationLength)
