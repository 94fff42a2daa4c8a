#!/usr/bin/env bash
# The standard matrix against Ember (:8000) and llama-cpp-python (:8001), both already running on
# the same GGUF and nothing else loading the machine. Results go to benchmarks/results/*.json, then
# the comparison table is printed (and saved as benchmarks/results/table.md).
#   usage: benchmarks/run_all.sh [EMBER_URL] [LLAMACPP_URL]
#   env:   N1 / N16 / NPREFILL requests for the c=1 / c=16 / prefill runs (default 8 / 48 / 6);
#          ONLY=ember or ONLY=llamacpp runs one server's half.
set -euo pipefail
cd "$(dirname "$0")/.."
EMBER="${1:-http://127.0.0.1:8000/v1}"
LLAMA="${2:-http://127.0.0.1:8001/v1}"
N1="${N1:-8}" N16="${N16:-48}" NPREFILL="${NPREFILL:-6}" ONLY="${ONLY:-}"
OUT=benchmarks/results
mkdir -p "$OUT"
B=(.venv/bin/python -m ember.bench)
EOS=2  # <|im_end|>: llama-cpp-python has no ignore_eos, so its EOS logit is biased to -100 instead

# name, base URL, how it is kept from stopping early
servers=()
[ "$ONLY" != llamacpp ] && servers+=("ember|$EMBER|--ignore-eos")
[ "$ONLY" != ember ] && servers+=("llamacpp|$LLAMA|--eos-bias $EOS")

for s in "${servers[@]}"; do
  IFS='|' read -r name url eos <<< "$s"
  if ! curl -sf "$url/models" > /dev/null; then
    echo "$name is not answering at $url/models" >&2
    exit 1
  fi
done

files=()
for c in 1 16; do
  n=$(( c == 1 ? N1 : N16 ))
  for s in "${servers[@]}"; do
    IFS='|' read -r name url eos <<< "$s"
    # shellcheck disable=SC2086  # $eos is two words on purpose
    "${B[@]}" --base-url "$url" --label "$name c=$c" --concurrency "$c" --num-requests "$n" \
      --prompt-tokens 100 --max-tokens 64 $eos --warmup 2 --json-out "$OUT/$name-c$c.json"
    files+=("$OUT/$name-c$c.json")
  done
done
# prefill: a ~512-token prompt, one output token, one request at a time: prefill tok/s = prompt / TTFT
for s in "${servers[@]}"; do
  IFS='|' read -r name url eos <<< "$s"
  "${B[@]}" --base-url "$url" --label "$name prefill-512" --concurrency 1 --num-requests "$NPREFILL" \
    --prompt-tokens 512 --max-tokens 1 --warmup 1 --json-out "$OUT/$name-prefill.json"
  files+=("$OUT/$name-prefill.json")
done

echo
"${B[@]}" --compare "${files[@]}" | tee "$OUT/table.md"
