#!/usr/bin/env bash
# The reference server for benchmarks: llama-cpp-python's OpenAI-compatible server on the same GGUF.
# It lives in its own throwaway venv (benchmarks/.venv-llamacpp, git-ignored) and is never a
# dependency of Ember. PyPI has no prebuilt llama-cpp-python wheel (only the sdist), so the first
# run compiles llama.cpp: a plain CPU build (no BLAS, no GPU), 2 jobs, ~10 minutes on 2 cores.
#   usage: benchmarks/llamacpp_server.sh [PORT]     (default 8001; GGUF=... picks another model)
#          benchmarks/llamacpp_server.sh --build-only
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=benchmarks/.venv-llamacpp
VERSION=0.3.16
BUILD_ONLY=0
if [ "${1:-}" = "--build-only" ]; then BUILD_ONLY=1; shift; fi
PORT="${1:-8001}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  python3 -m venv "$VENV"
  # No -march=native (GGML_NATIVE): 0.3.36's native build (AMX on this Xeon) segfaults in decode;
  # 0.3.16 with the x86 SIMD levels named explicitly runs. AVX-512 only where the CPU has it.
  FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BLAS=OFF"
  if grep -qw avx512f /proc/cpuinfo; then FLAGS="$FLAGS -DGGML_AVX512=ON"; fi
  started=$(date +%s)
  echo "building llama-cpp-python $VERSION (CMAKE_ARGS=$FLAGS) ..." >&2
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$VENV/bin/pip" install -q --no-binary llama-cpp-python "llama-cpp-python[server]==$VERSION"
  echo "built in $(( $(date +%s) - started )) s" >&2
fi
[ "$BUILD_ONLY" = 1 ] && exit 0

GGUF="${GGUF:-$(.venv/bin/python -c "from ember.models.loader import default_model_path; print(default_model_path())")}"
# - n_ctx 8192 matches Ember's context; 2 threads = this machine's cores, for decode and prefill.
# - No --chat_format: the chat template then comes from the GGUF (SmolLM2's ChatML with its default
#   system prompt), the same one Ember applies, so both servers see the same prompt tokens.
#   (--chat_format chatml would drop that system prompt: ~20 fewer prompt tokens than Ember.)
# - llama-cpp-python's server has no parallel slots or batching (0.3.16 has no such flag): one
#   request runs at a time behind a lock, which is its best concurrent throughput here. With
#   --interrupt_requests False a queued request waits instead of cutting the running stream short.
exec "$VENV/bin/python" -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port "$PORT" \
  --n_ctx 8192 --n_threads 2 --n_threads_batch 2 --n_batch 512 --interrupt_requests False
