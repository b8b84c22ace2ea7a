#!/usr/bin/env bash
# Prints the path of the launch crate's release test binary (building it first), whose ignored
# test `collective::tests::all_reduce_worker` the collective stress scripts run as workers.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test -p temper-launch --release --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "temper_launch" and m.get("executable"):
        print(m["executable"])'
