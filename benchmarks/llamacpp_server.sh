#!/usr/bin/env bash
# The reference server for benchmarks: llama-cpp-python's OpenAI-compatible server on the same GGUF.
# It lives in its own throwaway venv (benchmarks/.venv-llamacpp, git-ignored) and is never a
# dependency of Ember. First run compiles llama.cpp (a plain CPU build; ~10 minutes on 2 cores).
#   usage: benchmarks/llamacpp_server.sh [PORT]      (default 8001)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-8001}"
VENV=benchmarks/.venv-llamacpp
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  python3 -m venv "$VENV"
  # 0.3.36's native (AMX) build segfaults in decode on this machine's Xeon; 0.3.16 with explicit
  # AVX-512 flags runs.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 "$VENV/bin/pip" install -q "llama-cpp-python[server]==0.3.16"
fi
GGUF=$(.venv/bin/python -c "from ember.models.loader import default_model_path; print(default_model_path())")
# n_ctx 8192 matches Ember's context; 2 threads = this machine's cores; the chat template comes from the GGUF. llama-cpp-python's server
# runs one request at a time (no parallel slots; queued, not interrupted), which is what the
# concurrency-16 column measures.
exec "$VENV/bin/python" -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port "$PORT" \
  --n_ctx 8192 --n_threads 2 --n_threads_batch 2 --n_batch 512 --interrupt_requests False
