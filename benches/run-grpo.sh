#!/usr/bin/env bash
# GRPO (LoRA) step time and generation speed on the CPU: `temper train` beside TRL's
# GRPOTrainer (transformers generation, no vLLM), in one command, same model (SmolLM2-135M from
# the same GGUF), same settings (benches/configs/grpo-bench.yaml): 4 arithmetic prompts x 8
# completions of at most 48 tokens per step at temperature 0.7, LoRA r=16 all-linear, 2 threads.
# Completions are sampled, so their lengths differ between the two: compare the generated tokens
# per second as well as the step time.
#   benches/run-grpo.sh [STEPS]     (TRL from $PYTHON, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-5}
PYTHON=${PYTHON:-python3}
scripts/fetch-model.sh >/dev/null
cargo build --release >&2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
head -n $((4 * STEPS)) examples/data/arith_prompts_train.jsonl > "$WORK/prompts.jsonl"
/usr/bin/time -f "%M" -o "$WORK/rss" target/release/temper train benches/configs/grpo-bench.yaml \
  --set "data.path=$WORK/prompts.jsonl" --set "output_dir=$WORK/out" --set "training.max_steps=$STEPS" \
  2>"$WORK/log" >/dev/null
"$PYTHON" - "$WORK" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/out/metrics.jsonl")]
times = [r["step_time"] for r in rows][1:]
generated = [r["completions/mean_length"] * 32 for r in rows][1:]
rss = int(open(sys.argv[1] + "/rss").read().split()[-1]) / 1024
print(f"temper: {statistics.median(times):.1f} s per step (median, first excluded), "
      f"{sum(generated) / sum(times):.0f} generated tokens/s of step time, "
      f"mean completion {statistics.mean(r['completions/mean_length'] for r in rows):.1f} tokens, "
      f"generation alone {statistics.median(r['completions/tokens_per_second'] for r in rows):.0f} tokens/s, "
      f"peak RSS {rss:.0f} MiB")
PY
TRL_EXPERIMENTAL_SILENCE=1 "$PYTHON" benches/grpo_trl.py "$WORK/prompts.jsonl" "$STEPS" 2>/dev/null
