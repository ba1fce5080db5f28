#!/usr/bin/env bash
# atoma-embed against sentence-transformers on this machine: ROUNDS interleaved runs of
# benches/throughput.rs and bench/st_bench.py at each thread count, each run started once the
# CPUs have been idle for 2 s (or after 90 s of waiting, said in the output), so that a shared
# machine's other work spoils as few runs as possible. Read the best run of each.
#
#   python3 -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers
#   crates/atoma-embed/bench/compare.sh [ROUNDS=3] [THREADS...=2 1]
#
# PYTHON (default /tmp/st-venv/bin/python) runs st_bench.py; SECONDS_PER_RUN (default 4).
set -euo pipefail
cd "$(dirname "$0")/../../.."
rounds=${1:-3}
threads=(2 1)
if (($# > 1)); then
    shift
    threads=("$@")
fi
python=${PYTHON:-/tmp/st-venv/bin/python}
seconds=${SECONDS_PER_RUN:-4}
model=$(cargo run -q -p atoma-cli -- model path minilm)
cargo bench -q -p atoma-embed --bench throughput --no-run 2>/dev/null
bench=$(ls -t target/release/deps/throughput-* | grep -v '\.d$' | head -1)

idle() {
    local start=$SECONDS idle
    while :; do
        read -r _ u n s i w x y z _ </proc/stat
        local t1=$((u + n + s + i + w + x + y + z)) i1=$i
        sleep 2
        read -r _ u n s i w x y z _ </proc/stat
        local t2=$((u + n + s + i + w + x + y + z)) i2=$i
        idle=$((100 * (i2 - i1) / (t2 - t1)))
        if ((idle >= 90)); then echo "idle ${idle}%"; return; fi
        if ((SECONDS - start >= 90)); then echo "BUSY: ${idle}% idle"; return; fi
    done
}

for round in $(seq "$rounds"); do
    for t in "${threads[@]}"; do
        echo "== round $round, $t threads, atoma-embed ($(idle))"
        "$bench" --threads "$t" --seconds "$seconds" | tail -2
        echo "== round $round, $t threads, sentence-transformers ($(idle))"
        "$python" crates/atoma-embed/bench/st_bench.py "$model" --threads "$t" \
            --seconds "$seconds" 2>/dev/null | tail -2
    done
done
