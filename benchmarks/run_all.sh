#!/usr/bin/env bash
# The standard matrix, Ember against llama.cpp's llama-server (-np 16, continuous batching) on the same
# GGUF, one server at a time on a quiet machine: each is started here, measured, then stopped. Runs
# c=1 and c=16 streams (~100-token prompts, 64 tokens out, EOS ignored) and a ~512-token prefill,
# records each server's peak RSS, then llama-bench's raw prefill/decode. JSON and table.md land in
# benchmarks/results/ (git-ignored).
#   usage: benchmarks/run_all.sh
#   env:   GGUF (default: the bundled model), N1 / N16 / NPREFILL requests (8 / 48 / 6),
#          ONLY=ember or ONLY=llamacpp, EMBER_ARGS (extra `ember serve` flags)
set -euo pipefail
cd "$(dirname "$0")/.."
N1="${N1:-8}" N16="${N16:-48}" NPREFILL="${NPREFILL:-6}" ONLY="${ONLY:-}"
OUT=benchmarks/results
mkdir -p "$OUT"
B=(.venv/bin/python -m ember.bench)
GGUF="${GGUF:-$(.venv/bin/python -c "from ember.models.loader import default_model_path; print(default_model_path())")}"
BIN=$(benchmarks/llamacpp_server.sh --build-only)

wait_up() {  # url pid
  for _ in $(seq 1 600); do
    curl -sf "$1/health" > /dev/null && return 0
    kill -0 "$2" 2> /dev/null || { echo "server exited" >&2; return 1; }
    sleep 0.5
  done
  echo "no answer from $1" >&2
  return 1
}

measure() {  # name url pid
  local name=$1 url=$2 pid=$3
  for c in 1 16; do
    n=$(( c == 1 ? N1 : N16 ))
    "${B[@]}" --base-url "$url/v1" --label "$name c=$c" --concurrency "$c" --num-requests "$n" \
      --prompt-tokens 100 --max-tokens 64 --ignore-eos --warmup 2 --json-out "$OUT/$name-c$c.json"
  done
  # prefill: a ~512-token prompt, one output token, one request at a time: prefill tok/s = prompt / TTFT
  "${B[@]}" --base-url "$url/v1" --label "$name prefill-512" --concurrency 1 --num-requests "$NPREFILL" \
    --prompt-tokens 512 --max-tokens 1 --warmup 1 --json-out "$OUT/$name-prefill.json"
  echo "$name $(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$pid/status")" >> "$OUT/rss.txt"
  kill "$pid"
  wait "$pid" 2> /dev/null || true
}

: > "$OUT/rss.txt"
files=()
if [ "$ONLY" != llamacpp ]; then
  # shellcheck disable=SC2086  # EMBER_ARGS is a list of flags
  .venv/bin/ember serve --port 8000 --model "$GGUF" ${EMBER_ARGS:-} > "$OUT/ember-serve.log" 2>&1 &
  wait_up http://127.0.0.1:8000 $!
  measure ember http://127.0.0.1:8000 $!
  files+=("$OUT"/ember-c1.json "$OUT"/ember-c16.json "$OUT"/ember-prefill.json)
fi
if [ "$ONLY" != ember ]; then
  GGUF="$GGUF" benchmarks/llamacpp_server.sh 8001 > "$OUT/llamacpp-serve.log" 2>&1 &
  wait_up http://127.0.0.1:8001 $!
  measure llamacpp http://127.0.0.1:8001 $!
  files+=("$OUT"/llamacpp-c1.json "$OUT"/llamacpp-c16.json "$OUT"/llamacpp-prefill.json)
  "$BIN/llama-bench" -m "$GGUF" -p 512 -n 64 -t "$(nproc)" -o md > "$OUT/llama-bench.md"
fi

{
  "${B[@]}" --compare "${files[@]}"
  echo
  echo "peak RSS (MB): $(tr '\n' ' ' < "$OUT/rss.txt")"
  echo
  [ -f "$OUT/llama-bench.md" ] && cat "$OUT/llama-bench.md"
  echo
  echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; GGUF: $(basename "$GGUF")"
} | tee "$OUT/table.md"
