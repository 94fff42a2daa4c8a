#!/usr/bin/env bash
# The standard matrix against Ember (:8000) and llama-cpp-python (:8001), both already running on
# the same GGUF. Results go to benchmarks/results/*.json, then one comparison table is printed.
#   usage: benchmarks/run_all.sh [EMBER_URL] [LLAMACPP_URL]
set -euo pipefail
cd "$(dirname "$0")/.."
EMBER="${1:-http://127.0.0.1:8000/v1}"
LLAMA="${2:-http://127.0.0.1:8001/v1}"
OUT=benchmarks/results
mkdir -p "$OUT"
B=".venv/bin/ember bench"
EOS=2  # <|im_end|>: llama-cpp-python has no ignore_eos, so its EOS logit is biased to -100 instead

for c in 1 16; do
  n=$(( c == 1 ? 8 : 48 ))
  $B --base-url "$EMBER" --label "ember c=$c" --concurrency $c --num-requests $n --prompt-tokens 100 \
     --max-tokens 64 --ignore-eos --json-out "$OUT/ember-c$c.json"
  $B --base-url "$LLAMA" --label "llama-cpp-python c=$c" --concurrency $c --num-requests $n \
     --prompt-tokens 100 --max-tokens 64 --eos-bias $EOS --json-out "$OUT/llamacpp-c$c.json"
done
# prefill: a ~512-token prompt, one output token, one request at a time
$B --base-url "$EMBER" --label "ember prefill-512" --concurrency 1 --num-requests 6 --prompt-tokens 512 \
   --max-tokens 1 --json-out "$OUT/ember-prefill.json"
$B --base-url "$LLAMA" --label "llama-cpp-python prefill-512" --concurrency 1 --num-requests 6 \
   --prompt-tokens 512 --max-tokens 1 --json-out "$OUT/llamacpp-prefill.json"

$B --compare "$OUT"/ember-c1.json "$OUT"/llamacpp-c1.json "$OUT"/ember-c16.json "$OUT"/llamacpp-c16.json \
   "$OUT"/ember-prefill.json "$OUT"/llamacpp-prefill.json
