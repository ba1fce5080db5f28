#!/usr/bin/env bash
# Serving benchmark: the same concurrency sweep and workloads against an atoma node and against
# llama.cpp's llama-server (-np N, same GGUF, same thread count), then a markdown table and a PNG.
#
#   scripts/bench-serving.sh [MODEL] [ROUNDS]     MODEL: default | gemma3 (default: default)
#
# Needs llama-server from ../shared/tools/build-llama-server.sh (looked up in $LLAMA_SERVER,
# ~/.cache/llama-baseline/bin, then PATH) and matplotlib for the plot (installed into .venv).
# Writes bench/serving-<model>.{jsonl,md,png}. ENGINES=atoma (or llama-server) runs one side only,
# into bench/serving-<model>-<engine>.jsonl, for quick looks between full runs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-default}"
ROUNDS="${2:-2}"
LEVELS="${LEVELS:-1,2,4,8,16,32}"
THREADS="${THREADS:-$(nproc)}"
cargo build --release -p atoma-cli
ATOMA=./target/release/atoma
GGUF="$($ATOMA model path "$MODEL")"
LLAMA_SERVER="${LLAMA_SERVER:-$HOME/.cache/llama-baseline/bin/llama-server}"
[ -x "$LLAMA_SERVER" ] || LLAMA_SERVER="$(command -v llama-server || true)"
[ -n "$LLAMA_SERVER" ] || { echo "llama-server not found: run ../shared/tools/build-llama-server.sh" >&2; exit 1; }
export LD_LIBRARY_PATH="$(dirname "$LLAMA_SERVER"):${LD_LIBRARY_PATH:-}"
mkdir -p bench
ENGINES="${ENGINES:-atoma,llama-server}"
if [ "$ENGINES" = "atoma,llama-server" ]; then OUT="bench/serving-$MODEL.jsonl"; else OUT="bench/serving-$MODEL-$ENGINES.jsonl"; fi
rm -f "$OUT"
HOME_DIR="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$HOME_DIR"; }
trap cleanup EXIT
wait_up() { for _ in $(seq 1 600); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "server at $1 did not come up" >&2; return 1; }

if [[ ",$ENGINES," == *",atoma,"* ]]; then
# atoma: a local ledger, a stack large enough for the whole sweep, the node on port 3100.
$ATOMA --home "$HOME_DIR" --threads "$THREADS" up --model "$MODEL" --bind 127.0.0.1:3100 \
  --stack-units 1000000 --no-run 2>"$HOME_DIR/up.log" || { cat "$HOME_DIR/up.log" >&2; exit 1; }
ATOMA__ENGINE__MAX_NUM_SEQS=32 $ATOMA --home "$HOME_DIR" --threads "$THREADS" node run \
  --config "$HOME_DIR/node.toml" 2>"$HOME_DIR/node.log" &
NODE=$!
wait_up http://127.0.0.1:3100/health
for W in random shared-prefix; do
  $ATOMA --home "$HOME_DIR" loadgen --url http://127.0.0.1:3100 --tokenizer "$MODEL" --workload $W \
    --concurrency "$LEVELS" --rounds "$ROUNDS" --sign --label atoma --out "$OUT"
done
kill $NODE; wait $NODE 2>/dev/null || true
fi

if [[ ",$ENGINES," == *",llama-server,"* ]]; then

# llama-server: one server per level with N = concurrency slots of 2048 tokens each.
for C in ${LEVELS//,/ }; do
  "$LLAMA_SERVER" -m "$GGUF" -t "$THREADS" -np "$C" -c $((C * 2048)) --host 127.0.0.1 \
    --port 3200 >"$HOME_DIR/llama-$C.log" 2>&1 &
  LS=$!
  wait_up http://127.0.0.1:3200/health
  for W in random shared-prefix; do
    $ATOMA loadgen --url http://127.0.0.1:3200 --tokenizer "$MODEL" --workload $W \
      --concurrency "$C" --rounds "$ROUNDS" --label llama-server --out "$OUT"
  done
  kill $LS; wait $LS 2>/dev/null || true
done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q matplotlib==3.10.7
.venv/bin/python tools/plot-serving.py "$OUT" --title "$MODEL ($(basename "$GGUF")), $THREADS threads"
