#!/usr/bin/env bash
# Speculative decoding, measured on one `ember serve` (bundled model unless GGUF is set), each pair of runs
# back to back on the same server so that only the request differs:
#   code-edit   c=1: a one-line change to a ~400-token file, with the original as `prediction` vs without;
#   rewrite     c=1,2,4,8,16: a passage to repeat, prompt lookup on (the default) vs `speculation: false`
#               (where the lines cross is where drafting stops paying);
#   random      c=16: word lists, greedy (SmolLM2 tends to repeat them) and at temperature 1 (where drafts
#               rarely match), prompt lookup on vs off: what drafting costs where it helps little.
# Ratios print at the end; JSON lands in benchmarks/results/spec-*.json (git-ignored).
#   usage: benchmarks/speculation.sh        env: GGUF, N (requests per run, default 6), N16 (default 48)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-6}" N16="${N16:-48}"
OUT=benchmarks/results
mkdir -p "$OUT"
GGUF="${GGUF:-$(.venv/bin/python -c "from ember.models.loader import default_model_path; print(default_model_path())")}"
.venv/bin/ember serve --port 8010 --model "$GGUF" > "$OUT/spec-serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2> /dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf http://127.0.0.1:8010/health > /dev/null && break; sleep 0.5; done

SEED=0
bench() {  # name, then ember bench flags; every run gets prompts of its own (a new --seed), so that no run
  # is served from the prefix cache another one filled
  local name=$1
  shift
  SEED=$((SEED + 1))
  .venv/bin/python -m ember.bench --base-url http://127.0.0.1:8010/v1 --label "$name" --warmup 1 \
    --seed "$SEED" --json-out "$OUT/spec-$name.json" "$@" > /dev/null
}
OFF='{"speculation": false}'
bench code-edit-predicted --workload code-edit -c 1 -n "$N" --max-tokens 512
bench code-edit-plain --workload code-edit --no-prediction -c 1 -n "$N" --max-tokens 512 --extra-body "$OFF"
for c in 1 2 4 8 16; do
  n=$(( c * 2 > N ? c * 2 : N ))
  bench "rewrite-c$c-lookup" --workload rewrite --prompt-tokens 300 -c "$c" -n "$n" --max-tokens 256
  bench "rewrite-c$c-off" --workload rewrite --prompt-tokens 300 -c "$c" -n "$n" --max-tokens 256 --extra-body "$OFF"
done
for t in 0 1; do
  bench "random-c16-t$t-lookup" -c 16 -n "$N16" --max-tokens 64 --ignore-eos --temperature "$t"
  bench "random-c16-t$t-off" -c 16 -n "$N16" --max-tokens 64 --ignore-eos --temperature "$t" --extra-body "$OFF"
done

.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(name):
    return json.load(open(f"{out}/spec-{name}.json"))
def line(what, fast, slow):
    a, b = load(fast), load(slow)
    print(f"| {what} | {a['output_tok_s']} | {b['output_tok_s']} | {a['output_tok_s'] / b['output_tok_s']:.2f}x "
          f"| {a['mean_output_tokens']} / {b['mean_output_tokens']} |")
print("| workload | with drafts tok/s | without tok/s | ratio | output tokens (with / without) |")
print("|---|---|---|---|---|")
line("code-edit c=1 (prediction)", "code-edit-predicted", "code-edit-plain")
for c in (1, 2, 4, 8, 16):
    line(f"rewrite c={c} (prompt lookup)", f"rewrite-c{c}-lookup", f"rewrite-c{c}-off")
line("random c=16 greedy (prompt lookup)", "random-c16-t0-lookup", "random-c16-t0-off")
line("random c=16 temperature 1 (prompt lookup)", "random-c16-t1-lookup", "random-c16-t1-off")
print(f"accepted prediction tokens (code-edit): {load('code-edit-predicted')['accepted_prediction_tokens']}")
PY
