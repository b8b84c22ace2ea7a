#!/usr/bin/env bash
# SmolLM2-135M forward and forward+backward throughput on the CPU backends, with PyTorch
# doing the same work in the same command (the machine is noisy: compare within one run).
#   benches/run-forward.sh [BATCH SEQ ITERS]    (PyTorch from $PYTHON, default python3;
#                                               MODES="forward train lora-train" by default)
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-2}; SEQ=${2:-256}; ITERS=${3:-3}
PYTHON=${PYTHON:-python3}
scripts/fetch-model.sh >/dev/null
cargo build --release --bench forward >&2
CARGO_TARGET_DIR=target/flex cargo build --release --bench forward --no-default-features --features flex >&2
bench() { find "$1/release/deps" -maxdepth 1 -type f -executable -name 'forward-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2; }
NDARRAY=$(bench target); FLEX=$(bench target/flex)
for mode in ${MODES:-forward train lora-train}; do
  "$NDARRAY" "$mode" "$BATCH" "$SEQ" "$ITERS"
  "$FLEX" "$mode" "$BATCH" "$SEQ" "$ITERS"
  "$PYTHON" benches/forward_torch.py "$mode" "$BATCH" "$SEQ" "$ITERS" 2>/dev/null
done
