#!/usr/bin/env bash
# Data pipeline throughput: read + render (chat template) + tokenize + pack a generated
# 100k-row conversational JSONL with `temper data inspect` (one whole epoch), and its peak memory.
#   benches/run-data.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-100000}
scripts/fetch-model.sh >/dev/null
cargo build --release >&2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
python3 -c "
import json, random
r = random.Random(0)
words = open('README.md').read().split()
with open('$WORK/rows.jsonl', 'w') as f:
    for i in range($ROWS):
        q = ' '.join(r.choice(words) for _ in range(r.randint(5, 40)))
        a = ' '.join(r.choice(words) for _ in range(r.randint(20, 200)))
        f.write(json.dumps({'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}) + '\n')"
ls -la "$WORK/rows.jsonl" | awk '{printf "dataset: %d rows, %.0f MiB\n", '"$ROWS"', $5 / 1048576}'
/usr/bin/time -f "wall %e s, peak RSS %M KiB" target/release/temper data inspect benches/configs/sft-bench.yaml \
  --set "data.path=$WORK/rows.jsonl" --set data.packing=true --set data.max_length=1024 \
  --set data.assistant_only_loss=true --set training.micro_batch_size=8 -n 0 2>&1 | grep -E "rows read|tokens|efficiency|wall"
