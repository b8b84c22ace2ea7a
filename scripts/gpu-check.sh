#!/usr/bin/env bash
# Everything Temper checks on a GPU, in one call (see DEVELOPERS.md): how long the first steps
# take to compile, correctness against the committed PEFT fixture run, then throughput beside
# PyTorch + PEFT doing the same work. Prints a short table last; full logs go to OUT_DIR.
#   scripts/gpu-check.sh OUT_DIR
# gpu-bin/temper: the stripped binary built with --no-default-features --features cuda.
# BUDGET (seconds, default 420) bounds the whole script: each run gets what is left, less a
# reserve for the rest, so the table always comes back. ONLY="a b" runs only those sections.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu-check.sh OUT_DIR}"; mkdir -p "$OUT"
TEMPER="${TEMPER:-gpu-bin/temper}"
DEV="${DEV:-cuda}"   # DEV=cpu TEMPER=target/release/temper checks the script's logic on a CPU machine
PY="${PYTHON:-python3}"
DEADLINE=$(( $(date +%s) + ${BUDGET:-420} ))
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"
LOG="$OUT/all.log"; : > "$LOG"   # only a few files come back: every log goes into this one
W=$(mktemp -d)
# cubecl autotunes each new kernel shape on first use; "minimal" keeps a cold call inside the lease.
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"
echo "CUBECL_AUTOTUNE_LEVEL=$CUBECL_AUTOTUNE_LEVEL, budget ${BUDGET:-420}s" | tee -a "$SUMMARY"
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
# Seconds a run may take: its own limit, but never past the deadline less RESERVE.
allow() { local left=$(( DEADLINE - $(date +%s) - ${RESERVE:-20} )); (( left < $1 )) && echo $left || echo "$1"; }

# Runs a command (limit $LIMIT) while sampling GPU memory every 200 ms; appends the command's
# result line (a line starting `temper ` or `pytorch `, else FAILED), peak memory, and memory at
# a quarter and at the end of the run (growth over steps shows as a difference).
measure() {
  local name=$1; shift
  local limit; limit=$(allow "${LIMIT:-120}")
  if (( limit < 15 )); then echo "$name: skipped (no time left)" | tee -a "$SUMMARY"; return; fi
  local mem=$W/mem-$name; local t0; t0=$(date +%s)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$mem" 2>/dev/null &
  local sampler=$!
  local log=$W/log-$name
  timeout -s KILL "$limit" "$@" > "$log" 2>&1; local rc=$?
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  { echo "=== $name (limit ${limit}s, rc $rc): $*"; cat "$log"; } >> "$LOG"
  local line; line=$(grep -E '^(temper|pytorch) ' "$log" | tail -1)
  [ -n "$line" ] || line="$name: FAILED rc=$rc ($(grep -v '^\s*$' "$log" | tail -2 | tr '\n' ' ' | cut -c1-200))"
  local n; n=$(wc -l < "$mem")
  local mems="peak $(sort -n "$mem" | tail -1) MiB"
  (( n > 8 )) && mems="$mems, at 1/4 $(sed -n "$(( n / 4 ))p" "$mem"), at end $(tail -1 "$mem")"
  echo "$line | $mems | $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
}

# A `temper train` result line from a metrics file: steps done, median tokens/s of steps 3+.
rate() { "$PY" - "$@" <<'PY'
import json, statistics, sys
path, name = sys.argv[1], sys.argv[2]
try:
    rows = [r for r in map(json.loads, open(path)) if "tokens_per_second" in r]
except OSError:
    rows = []
tps = [r["tokens_per_second"] for r in rows]
first = f"first step {rows[0]['num_tokens'] / tps[0]:.1f}s" if rows else "no step"
late = f"{statistics.median(tps[2:]):.0f} tokens/s (median of steps 3+)" if len(tps) > 2 else "too few steps"
ar = [r["all_reduce_seconds"] for r in rows[2:] if "all_reduce_seconds" in r]
ar = f", all-reduce {1e3 * statistics.median(ar):.2f} ms (median of steps 3+)" if ar else ""
print(f"temper {name}: {len(rows)} steps, {first}, {late}{ar}")
PY
}
export W PY TEMPER DEV; export -f rate

# Compile and correctness: the PEFT fixture run of tests/train.rs (10 LoRA steps on the tiny
# model) against PyTorch + PEFT's per-step losses. Each run logs the kernels NVRTC compiled.
tiny() { # name precision [env...]: one run, its parity line and its kernel count
  local name=$1 prec=$2; shift 2
  sed "s|OUT|$W/$name|; s|PREC|$prec|" > "$W/$name.yaml" <<'YAML'
model: {path: tests/fixtures/train/tiny}
adapter: {type: lora, path: tests/fixtures/train/init_adapter, loraplus_lr_ratio: 2.0}
data: {path: tests/fixtures/train/data.jsonl, shuffle: false, max_length: 64}
training: {max_steps: 10, micro_batch_size: 2, gradient_accumulation_steps: 2, learning_rate: 1.0e-2,
  lr_scheduler: linear, warmup_steps: 2, weight_decay: 0.01, max_grad_norm: 1.0, precision: PREC}
output_dir: OUT
YAML
  local limit; limit=$(allow "${LIMIT:-90}")
  (( limit < 15 )) && { echo "tiny $name: skipped (no time left)" | tee -a "$SUMMARY"; return; }
  local t0; t0=$(date +%s)
  echo "=== tiny $name $prec $*" >> "$LOG"
  env "$@" TEMPER_KERNEL_LOG="$W/kernels-$name" timeout -s KILL "$limit" "$TEMPER" --device "$DEV" train "$W/$name.yaml" >> "$LOG" 2>&1
  local rc=$?
  "$PY" - "$W/$name/metrics.jsonl" "$name $prec" "$(cat "$W/kernels-$name" 2>/dev/null | wc -l)" "$(( $(date +%s) - t0 ))" "$rc" <<'PY' | tee -a "$SUMMARY"
import json, sys
path, name, kernels, wall, rc = sys.argv[1:]
try:
    rows = [r for r in map(json.loads, open(path)) if "loss" in r]
except OSError:
    rows = []
want = json.load(open("tests/fixtures/train/expected.json"))["loss"]
err = max((abs(r["loss"] - w) / abs(w) for r, w in zip(rows, want)), default=float("nan"))
print(f"tiny {name}: {len(rows)}/10 steps in {wall}s (exit {rc}), {kernels} kernels compiled, "
      f"max rel loss error vs PEFT {err:.2e}")
PY
}

if want peak; then
  echo "== the bf16 matmul rate (MFU's denominator)" | tee -a "$SUMMARY"
  timeout 60 "$PY" benches/gpu_torch.py peak 2>&1 | tee -a "$LOG" | grep '^bf16' | tee -a "$SUMMARY"
fi
if want compile; then
  echo "== compile cost and parity (tiny model, 10 steps; kernel cache per variant)" | tee -a "$SUMMARY"
  # Cold, fused (the default); then the same with its cache warm; then burn's unfused backend.
  LIMIT=80 tiny f32-cold f32 TEMPER_KERNEL_CACHE="$W/kc-fused"
  LIMIT=45 tiny f32-warm f32 TEMPER_KERNEL_CACHE="$W/kc-fused"
  LIMIT=75 tiny f32-unfused f32 TEMPER_KERNEL_CACHE="$W/kc-unfused" TEMPER_KERNEL_FUSION=0
fi
# The variant the throughput runs use: FUSION=0 picks the unfused backend.
export TEMPER_KERNEL_FUSION="${FUSION:-1}" TEMPER_KERNEL_CACHE="$W/kc-$([ "${FUSION:-1}" = 0 ] && echo unfused || echo fused)"
if want parity; then
  for prec in ${PRECS:-bf16}; do LIMIT=45 tiny "$prec" "$prec"; done
fi

# Random-weight models of the benchmark shapes: config.json + the tiny tokenizer (word-level:
# "w5 w9 ..." is one token per word). Pre-tokenized rows of full length for SFT; for DPO,
# prompts of SEQ/8 words and completions long enough to be cut at max_length.
mkmodel() { mkdir -p "$W/$1"; cp "$2" "$W/$1/config.json"; cp tests/fixtures/train/tiny/tokenizer*.json "$W/$1/"; }
mkmodel smol benches/configs/smollm2-135m.json; mkmodel l1b benches/configs/llama-3.2-1b.json
rows() { "$PY" -c "
import json
with open('$W/rows-$1.jsonl', 'w') as f:
    for r in range($2):
        f.write(json.dumps({'input_ids': [(r * 131 + i * 7919 + 13) % 49152 for i in range($1)]}) + '\\n')"; }
pairs() { "$PY" -c "
import json
w = lambda r, n, k: ' '.join(f'w{3 + (r * 31 + i * k) % 125}' for i in range(n))
with open('$W/pairs-$1.jsonl', 'w') as f:
    for r in range($2):
        f.write(json.dumps({'prompt': w(r, $1 // 8, 7), 'chosen': w(r, $1, 11), 'rejected': w(r, $1, 13)}) + '\\n')"; }
tsft() { # name model batch seq steps [--set ...]; RUN="launch ..." runs it under `temper launch`
  local name=$1 model=$2 b=$3 s=$4 n=$5; shift 5
  rows "$s" $(( b * n ))
  "$TEMPER" --device "$DEV" ${RUN:-train} benches/configs/gpu-train.yaml --set "model.path=$W/$model" \
    --set "data.path=$W/rows-$s.jsonl" --set "data.max_length=$s" --set "output_dir=$W/out-$name" \
    --set "training.micro_batch_size=$b" --set "training.max_steps=$n" --set "training.precision=$BENCH_PREC" "$@"
  rate "$W/out-$name/metrics.jsonl" "$name sft $BENCH_PREC ${b}x${s}"; }
tdpo() { # name model pairs seq steps
  local name=$1 model=$2 b=$3 s=$4 n=$5
  pairs "$s" $(( b * n ))
  "$TEMPER" --device "$DEV" train benches/configs/gpu-train.yaml --set "model.path=$W/$model" \
    --set "data.path=$W/pairs-$s.jsonl" --set "data.max_length=$s" --set "output_dir=$W/out-$name" \
    --set "training.micro_batch_size=$b" --set "training.max_steps=$n" --set "training.precision=$BENCH_PREC" \
    --set training.objective=dpo
  rate "$W/out-$name/metrics.jsonl" "$name dpo $BENCH_PREC ${b}x2x${s}"; }
export BENCH_PREC="${BENCH_PREC:-bf16}"   # BENCH_PREC=f32 for the logic check on a CPU
export -f rows pairs tsft tdpo

S=benches/configs/smollm2-135m.json; L=benches/configs/llama-3.2-1b.json
if want smol; then
  echo "== SmolLM2-135M shape, LoRA r=16 all-linear, bf16 (Temper: up to 200 steps)" | tee -a "$SUMMARY"
  LIMIT=60 measure p-smol-sft "$PY" benches/gpu_torch.py $S sft bf16 8 512 10
  TEMPER_KERNEL_LOG=$W/kernels-smol LIMIT=${SMOL_LIMIT:-150} measure t-smol-sft bash -c "tsft smol smol 8 512 200"
  echo "kernels compiled by that run: $(cat "$W/kernels-smol" 2>/dev/null | wc -l)" | tee -a "$SUMMARY"
fi
if want 1b; then
  echo "== Llama-3.2-1B shape, LoRA SFT 8 x 2048 (Temper with activation checkpointing)" | tee -a "$SUMMARY"
  LIMIT=${L1B_LIMIT:-150} measure t-1b-sft bash -c "tsft l1b l1b 8 2048 8 --set training.gradient_checkpointing=true"
  LIMIT=60 measure p-1b-sft "$PY" benches/gpu_torch.py $L sft bf16 8 2048 5
fi
if want dpo; then
  echo "== DPO step, SmolLM2 shape, 4 pairs x 512 tokens" | tee -a "$SUMMARY"
  LIMIT=90 measure t-smol-dpo bash -c "tdpo smoldpo smol 4 512 20"
  LIMIT=60 measure p-smol-dpo "$PY" benches/gpu_torch.py $S dpo bf16 4 512 10
fi
# Losses of two runs of the tiny fixture job: "NAME: N/10 steps, max rel loss difference E".
same_losses() { "$PY" - "$W/$1/metrics.jsonl" "$W/$2/metrics.jsonl" "$3" <<'PY' | tee -a "$SUMMARY"
import json, sys
def losses(p):
    try:
        return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
    except OSError:
        return []
a, b = losses(sys.argv[1]), losses(sys.argv[2])
err = max((abs(x - y) / abs(x) for x, y in zip(a, b)), default=float("nan"))
print(f"{sys.argv[3]}: {len(b)}/10 steps, max rel loss difference {err:.2e}")
PY
}
if want launch; then
  # `temper launch` with two workers sharing the device takes the multi-worker path through
  # burn-collective (NCCL refuses two ranks on one GPU) and must give the one-worker losses
  # (2 workers x micro-batch 1 = 1 x 2).
  sed "s|$W/f32-warm|$W/launch2|; s|micro_batch_size: 2|micro_batch_size: 1|" "$W/f32-warm.yaml" > "$W/launch2.yaml"
  timeout "$(allow 90)" "$TEMPER" --device "$DEV" launch --devices 0,0 --engine burn --master-port 29610 "$W/launch2.yaml" >> "$LOG" 2>&1
  echo "launch 2 workers on one device (burn engine): exit $?" | tee -a "$SUMMARY"
  same_losses f32-warm launch2 "launch 2 workers vs 1"
fi
if want nccl; then
  # One GPU: world size 1 through the whole NCCL path (rendezvous, communicator, device
  # buckets) must give the single-process losses; then the all-reduce's time per step for
  # SmolLM2's LoRA gradients (19.5 MB) and its full gradients (538 MB).
  E="${ENGINE:-nccl}"   # ENGINE=burn checks this section's logic on a CPU
  echo "== $E engine, world size 1" | tee -a "$SUMMARY"
  sed "s|$W/f32-warm|$W/nccl1|" "$W/f32-warm.yaml" > "$W/nccl1.yaml"
  timeout "$(allow 90)" "$TEMPER" --device "$DEV" launch --nproc-per-node 1 --engine "$E" --master-port 29620 "$W/nccl1.yaml" >> "$LOG" 2>&1
  echo "launch $E 1 worker: exit $? ($(grep -m1 -o 'data parallel: .*' "$W/nccl1/logs/rank-0.log" 2>/dev/null))" | tee -a "$SUMMARY"
  same_losses f32-warm nccl1 "$E world 1 vs one process"
  L="launch --nproc-per-node 1 --engine $E --master-port"
  LIMIT=90 measure t-nccl-lora env RUN="$L 29630" bash -c "tsft nccl-lora smol 8 512 20"
  LIMIT=120 measure t-nccl-full env RUN="$L 29640" bash -c "tsft nccl-full smol 4 512 12 --set adapter.type=full"
fi
cp "$W"/kernels-f32-cold "$OUT/kernels-fused.txt" 2>/dev/null
cp "$W"/kernels-f32-unfused "$OUT/kernels-unfused.txt" 2>/dev/null
echo; echo "== summary"; cat "$SUMMARY"
