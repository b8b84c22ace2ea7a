#!/usr/bin/env bash
# DPO (LoRA) throughput and peak memory on the CPU: `temper train` with the reference computed at
# each step, then with `precompute_ref_log_probs`, beside PyTorch + PEFT doing TRL's step (policy
# forward + backward, reference forward with the adapter disabled) in one command. SmolLM2-135M,
# r=16 all-linear, PAIRS pairs per step (2·PAIRS rows of ~250 tokens), AdamW; each in f32 and in
# bf16 (PyTorch with bf16 weights).
#   benches/run-dpo.sh [PAIRS STEPS]     (PyTorch from $PYTHON, default python3; PRECISIONS="bf16"
#   runs only those)
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-2}; STEPS=${2:-6}
PYTHON=${PYTHON:-python3}
scripts/fetch-model.sh >/dev/null
cargo build --release >&2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
# Plain-text pairs of common words: a ~120-word prompt and ~130-word completions.
"$PYTHON" -c "
import json, random
r = random.Random(0)
words = '''the of and to in is was for on that with as by at from his her they this have had not are but
were which one all their there been has when who will more no if out so said what up its about into than
them can only other new some could time these two may then do first any my now such like our over man me
even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get
here between both life being under never day same another know while last might us great old year off
come since against go came right used take three'''.split()
text = lambda n: ' '.join(r.choice(words) for _ in range(n))
with open('$WORK/pairs.jsonl', 'w') as f:
    for _ in range($PAIRS * $STEPS):
        f.write(json.dumps({'prompt': text(120), 'chosen': ' ' + text(130), 'rejected': ' ' + text(130)}) + '\n')"
report() {
  "$PYTHON" - "$WORK" "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/out/metrics.jsonl")][1:]
rate = statistics.median(r["tokens_per_second"] for r in rows)
rss = int(open(sys.argv[1] + "/rss").read().split()[-1]) / 1024
print(f"temper ({sys.argv[2]}): {rate:.0f} tokens/s (median step, first excluded), peak RSS {rss:.0f} MiB")
PY
}
PRECISIONS=${PRECISIONS:-f32 bf16}
for precision in $PRECISIONS; do
  for precompute in false true; do
    rm -rf "$WORK/out"
    /usr/bin/time -f "%M" -o "$WORK/rss" target/release/temper train benches/configs/dpo-bench.yaml \
      --set "data.path=$WORK/pairs.jsonl" --set "output_dir=$WORK/out" --set "training.precision=$precision" \
      --set "training.micro_batch_size=$PAIRS" --set "training.max_steps=$STEPS" \
      --set "training.dpo.precompute_ref_log_probs=$precompute" 2>"$WORK/log"
    grep -h "precomputed" "$WORK/log" || true
    report "$precision, reference $([ $precompute = true ] && echo precomputed || echo 'at each step')"
  done
done
for dtype in $PRECISIONS; do
  TORCH_DTYPE=$dtype "$PYTHON" benches/dpo_torch.py "$WORK/pairs.jsonl" "$PAIRS" "$STEPS" 2>/dev/null
done
