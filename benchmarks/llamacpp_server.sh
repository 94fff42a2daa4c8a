#!/usr/bin/env bash
# The reference for benchmarks: llama.cpp's own `llama-server` (continuous batching over -np slots)
# and `llama-bench`, built from the llama.cpp sources that ship inside the llama-cpp-python sdist,
# in a throwaway directory outside the repo (LLAMACPP_DIR, default ~/.cache/ember-llamacpp). Never a
# dependency of Ember. The first run downloads the sdist from PyPI and builds (~10 min on 2 cores).
#   usage: benchmarks/llamacpp_server.sh [PORT]        serve the default GGUF (GGUF=... for another)
#          benchmarks/llamacpp_server.sh --build-only  just build; prints the bin directory
#   env:   NP parallel slots (16), CTX total context (NP * 1024), THREADS (nproc), VERSION (0.3.36)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${LLAMACPP_DIR:-$HOME/.cache/ember-llamacpp}"
VERSION="${VERSION:-0.3.36}"
BIN="$DIR/build/bin"
BUILD_ONLY=0
if [ "${1:-}" = "--build-only" ]; then BUILD_ONLY=1; shift; fi
PORT="${1:-8001}"

if [ ! -x "$BIN/llama-server" ] || [ ! -x "$BIN/llama-bench" ]; then
  mkdir -p "$DIR"
  if [ ! -d "$DIR/src" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: -d "$DIR" "llama-cpp-python==$VERSION"
    tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
    mv "$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
    rm -rf "$DIR/llama_cpp_python-$VERSION"
  fi
  started=$(date +%s)
  # GGML_NATIVE: -march=native, what llama.cpp's own build does by default (AVX2, AVX-512, VNNI as present).
  # Its AMX path (ggml-cpu/amx, compiled in where the CPU has AMX) crashed with SIGSEGV in
  # ggml_backend_amx_mul_mat on a Sapphire Rapids VM (llama-server at load, llama-bench at once) although
  # the kernel grants AMX: there the build leaves AMX out (explicit -mno-* win over -march=native).
  noamx=""
  if grep -qw amx_int8 /proc/cpuinfo; then noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
  cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_BLAS=OFF \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" \
    -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF > "$DIR/cmake.log"
  cmake --build "$DIR/build" -j "$(nproc)" --target llama-server llama-bench > "$DIR/build.log"
  echo "built llama.cpp ($VERSION) in $(( $(date +%s) - started )) s: $BIN" >&2
fi
if [ "$BUILD_ONLY" = 1 ]; then echo "$BIN"; exit 0; fi

GGUF="${GGUF:-$(.venv/bin/python -c "from ember.models.loader import default_model_path; print(default_model_path())")}"
NP="${NP:-16}"
# - the context is split between the slots: NP * 1024 gives each slot room for the benchmark prompts
# - --jinja: the chat template comes from the GGUF (SmolLM2's ChatML with its default system
#   prompt), the same one Ember applies, so both servers see the same prompt tokens
exec "$BIN/llama-server" --model "$GGUF" --host 127.0.0.1 --port "$PORT" -np "$NP" \
  --ctx-size "${CTX:-$((NP * 1024))}" --threads "${THREADS:-$(nproc)}" --jinja --no-webui \
  --log-disable
