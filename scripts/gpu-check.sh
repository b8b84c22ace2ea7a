#!/usr/bin/env bash
# Everything Temper checks on a GPU, in one call (see DEVELOPERS.md): correctness against the
# committed fixtures, then throughput beside PyTorch + PEFT doing the same work. Prints a short
# table last; full logs go to OUT_DIR.
#   scripts/gpu-check.sh OUT_DIR      (BIN: the stripped `device_check` example built with
#                                      --no-default-features --features cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu-check.sh OUT_DIR}"; mkdir -p "$OUT"
BIN="${BIN:-gpu-bin/device_check}"
PY="${PYTHON:-python3}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"
# cubecl autotunes each new kernel shape on first use (~2 min for the first SmolLM2 forward on an
# H200 at the default level). Its cache lives in ./target, which survives between calls on a
# warm machine; "minimal" keeps a cold first call inside the lease.
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"
echo "CUBECL_AUTOTUNE_LEVEL=$CUBECL_AUTOTUNE_LEVEL" | tee -a "$SUMMARY"

# Runs a command while sampling GPU memory; appends its result line and peak memory. Only a
# few files come back from the device machine, so every log goes into one file.
LOG="$OUT/all.log"; : > "$LOG"
measure() {
  local name=$1; shift
  local mem; mem=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" 2>/dev/null &
  local sampler=$!
  local t0; t0=$(date +%s)
  local log; log=$(mktemp)
  timeout "${LIMIT:-150}" "$@" > "$log" 2>&1; local rc=$?
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  local peak; peak=$(sort -n "$mem" | tail -1)
  { echo "=== $name: $*"; cat "$log"; } >> "$LOG"
  local line; line=$(grep -E '^(temper|pytorch) ' "$log" | tail -1)
  [ -n "$line" ] || line="$name: FAILED rc=$rc ($(tail -2 "$log" | tr '\n' ' ' | cut -c1-200))"
  echo "$line | nvidia-smi peak ${peak:-?} MiB | $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
  rm -f "$mem" "$log"
}

echo "== parity (CUDA vs transformers/PEFT fixtures)" | tee -a "$SUMMARY"
timeout 300 "$BIN" --device cuda parity 2>&1 | tee -a "$LOG" | grep '^parity' | tee -a "$SUMMARY"

echo "== throughput (random weights from config.json; median after 1 warm-up)" | tee -a "$SUMMARY"
S=benches/configs/smollm2-135m.json; L=benches/configs/llama-3.2-1b.json
# Training steps first: they are what the issue measures, and the slowest to tune.
LIMIT=200 measure t-smol-lora "$BIN" --device cuda bench $S lora-train bf16 8 512 5
measure p-smol-lora     "$PY" benches/gpu_torch.py $S lora-train bf16 8 512 5
LIMIT=200 measure t-1b-lora "$BIN" --device cuda bench $L lora-train bf16 8 1024 3
measure p-1b-lora       "$PY" benches/gpu_torch.py $L lora-train bf16 8 1024 3
measure t-smol-fwd      "$BIN" --device cuda bench $S forward bf16 8 512 5
measure p-smol-fwd      "$PY" benches/gpu_torch.py $S forward bf16 8 512 5
measure t-1b-fwd        "$BIN" --device cuda bench $L forward bf16 8 1024 5
measure p-1b-fwd        "$PY" benches/gpu_torch.py $L forward bf16 8 1024 5
echo; echo "== summary"; cat "$SUMMARY"
