#!/usr/bin/env bash
# Stress the data-parallel all-reduce by hand: PAIRS pairs of processes at once (the launch
# crate's test worker, launch/src/collective.rs), each doing ROUNDS all-reduces (3 of 19.5 MB,
# then 8 000 values), every sum checked. Prints how many pairs finished.
#   benches/stress-collective.sh [PAIRS] [ROUNDS] [TOKIO_WORKER_THREADS]
# The third argument overrides what `temper` sets (1) to show what burn's default does.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-3} ROUNDS=${2:-2000} THREADS=${3:-1}
bin=$(benches/launch-test-bin.sh)
logs=$(mktemp -d)
for p in $(seq 0 $((PAIRS - 1))); do
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((31000 + 10 * p)) \
      TOKIO_WORKER_THREADS=$THREADS TEMPER_TEST_ROUNDS=$ROUNDS timeout $((ROUNDS / 5 + 120)) \
      "$bin" --exact collective::tests::all_reduce_worker --ignored --nocapture \
      >"$logs/pair-$p-rank-$r.log" 2>&1 &
  done
done
wait || true
ok=$(grep -l "all-reduces right" "$logs"/*.log | wc -l)
echo "$((ok / 2)) of $PAIRS pairs did $ROUNDS all-reduces right (workers done: $ok of $((2 * PAIRS)); logs in $logs)"
