#!/usr/bin/env bash
# LoRA SFT throughput and peak memory on the CPU: `temper train` in f32 and in bf16 beside PyTorch +
# PEFT doing the same work in f32 and with bf16 weights (its fastest CPU setting on AVX512-BF16):
# SmolLM2-135M, r=16 all-linear, micro-batch BATCH x 256 tokens, AdamW, in one command.
#   benches/run-sft.sh [BATCH STEPS]     (PyTorch from $PYTHON, default python3; another temper
#   binary, e.g. an older build for an A/B comparison, from $TEMPER; TORCH=0 skips PyTorch;
#   PRECISIONS="bf16" runs only those)
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-4}; STEPS=${2:-6}
PYTHON=${PYTHON:-python3}
scripts/fetch-model.sh >/dev/null
TEMPER=${TEMPER:-target/release/temper}
[ "$TEMPER" = target/release/temper ] && cargo build --release >&2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
# Full-length rows of varied token ids, so every micro-batch is exactly BATCH x 256 tokens.
"$PYTHON" -c "
import json, random
r = random.Random(0)
with open('$WORK/rows.jsonl', 'w') as f:
    for _ in range($BATCH * $STEPS):
        f.write(json.dumps({'input_ids': [r.randrange(100, 49000) for _ in range(256)]}) + '\n')"
PRECISIONS=${PRECISIONS:-f32 bf16}
for precision in $PRECISIONS; do
  rm -rf "$WORK/out"
  /usr/bin/time -f "%M" -o "$WORK/rss" "$TEMPER" train benches/configs/sft-bench.yaml \
    --set "data.path=$WORK/rows.jsonl" --set "output_dir=$WORK/out" --set "training.precision=$precision" \
    --set "training.micro_batch_size=$BATCH" --set "training.max_steps=$STEPS" 2>/dev/null
  "$PYTHON" - "$WORK" "$precision" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/out/metrics.jsonl")][1:]
rate = statistics.median(r["tokens_per_second"] for r in rows)
rss = int(open(sys.argv[1] + "/rss").read().split()[-1]) / 1024
print(f"temper (ndarray, {sys.argv[2]}): {rate:.0f} tokens/s (median step, first excluded), peak RSS {rss:.0f} MiB")
PY
done
if [ "${TORCH:-1}" != 0 ]; then
  for dtype in $PRECISIONS; do
    TORCH_DTYPE=$dtype "$PYTHON" benches/sft_torch.py "$WORK/rows.jsonl" "$BATCH" "$STEPS" 2>/dev/null
  done
fi
