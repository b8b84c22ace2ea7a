#!/usr/bin/env bash
# Checks that the README's evaluation table is what `temper eval configs/eval-arith.yaml`
# gives for the quickstart's adapter (trained first when runs/sft-lora is missing): about
# 3 minutes on 2 cores. Not part of the test suite (it trains); run it after changing
# training, generation or the scorers, and update the README when the numbers move.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f runs/sft-lora/adapter_config.json ] || scripts/quickstart.sh >/dev/null
got="$(cargo run --release --quiet -- eval configs/eval-arith.yaml 2>/dev/null | sed -n '/^| metric/,/^$/p' | sed '/^$/d')"
want="$(sed -n '/^| metric | n | base | runs\/sft-lora |$/,/^$/p' README.md | sed '/^$/d')"
if [ "$got" = "$want" ]; then
  echo "the README's evaluation table is reproduced"
else
  diff <(echo "$want") <(echo "$got") || true
  echo "the README's evaluation table differs from temper eval's (above: README <, now >)" >&2
  exit 1
fi
