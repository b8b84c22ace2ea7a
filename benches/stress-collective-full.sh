#!/usr/bin/env bash
# Stress the data-parallel all-reduce with full fine-tuning's buffers by hand: one pair of
# processes (the launch crate's test worker, launch/src/collective.rs) sums SmolLM2-135M's whole
# gradient (134 515 008 values, 538 MB) again and again for MINUTES minutes, in the chunks
# `temper` uses (2^25 values), every sum checked. Prints how many it did and their median time.
#   benches/stress-collective-full.sh [MINUTES] [VALUES]
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-20} VALUES=${2:-134515008}
bin=$(benches/launch-test-bin.sh)
logs=$(mktemp -d)
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=31500 TOKIO_WORKER_THREADS=1 \
    TEMPER_TEST_BIG_VALUES=$VALUES TEMPER_TEST_SECONDS=$((MINUTES * 60)) TEMPER_TEST_CHUNK=33554432 \
    timeout $((MINUTES * 60 + 600)) \
    "$bin" --exact collective::tests::all_reduce_worker --ignored --nocapture >"$logs/rank-$r.log" 2>&1 &
done
wait || true
for r in 0 1; do
  grep -h "all-reduces right" "$logs/rank-$r.log" || { echo "rank $r failed:"; tail -5 "$logs/rank-$r.log"; }
done
echo "logs in $logs"
