#!/usr/bin/env bash
# Everything Temper checks on a GPU, in one call (see DEVELOPERS.md): correctness against the
# committed fixtures, then throughput beside PyTorch + PEFT doing the same work. Prints a short
# table last; full logs go to OUT_DIR.
#   scripts/gpu-check.sh OUT_DIR      (gpu-bin/: the stripped `temper` binary and `device_check`
#                                      example built with --no-default-features --features cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu-check.sh OUT_DIR}"; mkdir -p "$OUT"
BIN="${BIN:-gpu-bin/device_check}"
TEMPER="${TEMPER:-gpu-bin/temper}"
DEV="${DEV:-cuda}"   # DEV=cpu TEMPER=target/release/temper checks the script's logic on a CPU machine
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
# The model-level checks (logits, LoRA gradients vs the fixtures) passed on an H200 before;
# PARITY=1 runs them again (needs gpu-bin/device_check).
[ -n "${PARITY:-}" ] && timeout 300 "$BIN" --device cuda parity 2>&1 | tee -a "$LOG" | grep '^parity' | tee -a "$SUMMARY"

# `temper train` on CUDA: the PEFT fixture run of tests/train.rs (10 LoRA steps), in f32 and
# bf16, against PyTorch + PEFT's per-step losses. PRECS="f32 f16 bf16" also runs f16 (dynamic
# loss scaling; not yet run on a GPU), ~100 s more; bf16 stays last (the launch step uses it).
W=$(mktemp -d)
for prec in ${PRECS:-f32 bf16}; do
  sed "s|OUT|$W/tiny-$prec|; s|PREC|$prec|" > "$W/tiny.yaml" <<'YAML'
model: {path: tests/fixtures/train/tiny}
adapter: {type: lora, path: tests/fixtures/train/init_adapter, loraplus_lr_ratio: 2.0}
data: {path: tests/fixtures/train/data.jsonl, shuffle: false, max_length: 64}
training: {max_steps: 10, micro_batch_size: 2, gradient_accumulation_steps: 2, learning_rate: 1.0e-2,
  lr_scheduler: linear, warmup_steps: 2, weight_decay: 0.01, max_grad_norm: 1.0, precision: PREC}
output_dir: OUT
YAML
  timeout 100 "$TEMPER" --device "$DEV" train "$W/tiny.yaml" >> "$LOG" 2>&1
  "$PY" - "$W/tiny-$prec/metrics.jsonl" "$prec" <<'PY' | tee -a "$SUMMARY"
import json, sys
try:
    got = [json.loads(l)["loss"] for l in open(sys.argv[1])]
except OSError:
    got = []
want = json.load(open("tests/fixtures/train/expected.json"))["loss"]
err = max((abs(a - b) / abs(b) for a, b in zip(got, want)), default=float("nan"))
print(f"parity train {sys.argv[2]}: {len(got)}/10 steps, max rel loss error vs PEFT {err:.2e}")
PY
done

# `temper launch` on the device, end to end: one worker (these machines have one GPU), then two
# workers sharing it, which takes the multi-GPU path (orchestrator, per-step all-reduce of the
# gradients) and must give the f32 run's losses (2 workers x micro-batch 1 = 1 x 2).
sed "s|$W/tiny-bf16|$W/launch1|; s|precision: bf16|precision: f32|" "$W/tiny.yaml" > "$W/launch1.yaml"
sed "s|$W/launch1|$W/launch2|; s|micro_batch_size: 2|micro_batch_size: 1|" "$W/launch1.yaml" > "$W/launch2.yaml"
timeout 120 "$TEMPER" --device "$DEV" launch --nproc-per-node 1 "$W/launch1.yaml" >> "$LOG" 2>&1
echo "launch 1 worker: exit $?" | tee -a "$SUMMARY"
timeout 120 "$TEMPER" --device "$DEV" launch --devices 0,0 --master-port 29610 "$W/launch2.yaml" >> "$LOG" 2>&1
echo "launch 2 workers on one device: exit $?" | tee -a "$SUMMARY"
"$PY" - "$W/tiny-f32/metrics.jsonl" "$W/launch2/metrics.jsonl" <<'PY' | tee -a "$SUMMARY"
import json, sys
def losses(p):
    try:
        return [json.loads(l)["loss"] for l in open(p)]
    except OSError:
        return []
a, b = losses(sys.argv[1]), losses(sys.argv[2])
err = max((abs(x - y) / abs(x) for x, y in zip(a, b)), default=float("nan"))
print(f"launch 2 workers vs 1: {len(b)}/10 steps, max rel loss difference {err:.2e}")
PY

# Random-weight models of the benchmark shapes: config.json + the tiny tokenizer (pre-tokenized
# data needs only its EOS). Rows of token ids, full length.
mkmodel() { mkdir -p "$W/$1"; cp "$2" "$W/$1/config.json"; cp tests/fixtures/train/tiny/tokenizer*.json "$W/$1/"; }
mkmodel smol benches/configs/smollm2-135m.json; mkmodel l1b benches/configs/llama-3.2-1b.json
rows() { "$PY" -c "
import json
with open('$W/rows-$1.jsonl', 'w') as f:
    for r in range($2):
        f.write(json.dumps({'input_ids': [(r * 131 + i * 7919 + 13) % 49152 for i in range($1)]}) + '\\n')"; }
train_rate() { "$PY" -c "
import json, statistics
rows = [json.loads(l) for l in open('$1/metrics.jsonl')][2:]
print(f'temper {\"$2\":<14} sft        bf16  $3: {statistics.median(r[\"tokens_per_second\"] for r in rows):.0f} tokens/s (median of steps 3+)')"; }
tsft() { # name model batch seq steps
  local out="$W/out-$1"; rows "$4" $(( $3 * $5 ))
  "$TEMPER" --device "$DEV" train benches/configs/gpu-train.yaml --set "model.path=$W/$2" \
    --set "data.path=$W/rows-$4.jsonl" --set "data.max_length=$4" --set "output_dir=$out" \
    --set "training.micro_batch_size=$3" --set "training.max_steps=$5" && train_rate "$out" "$2" "$3x$4"; }

[ -n "${SKIP_BENCH:-}" ] && { cat "$SUMMARY"; exit 0; }
echo "== throughput (random weights from config.json; median after warm-up)" | tee -a "$SUMMARY"
S=benches/configs/smollm2-135m.json; L=benches/configs/llama-3.2-1b.json
# Whole training steps (temper train: LoRA fwd+bwd, clipping, AdamW) beside PyTorch + PEFT.
export W PY TEMPER DEV; export -f rows train_rate tsft
LIMIT=150 measure t-smol-sft bash -c "tsft smol smol 8 512 12"
measure p-smol-sft      "$PY" benches/gpu_torch.py $S sft bf16 8 512 8
LIMIT=170 measure t-1b-sft bash -c "tsft l1b l1b 8 1024 8"
measure p-1b-sft        "$PY" benches/gpu_torch.py $L sft bf16 8 1024 5
echo; echo "== summary"; cat "$SUMMARY"
