#!/usr/bin/env bash
# Measures what `configs/sft-lora.yaml` (or `dpo-lora.yaml`) taught SmolLM2: on the 50
# held-out questions of examples/data/arith_test.jsonl, how many greedy answers end with the
# `#### N` line, how many have the right N, and how many state the right sum after the first
# `=`, without and with the adapter.
#   examples/eval_arith.sh [ADAPTER_DIR]   (default runs/sft-lora)
set -euo pipefail
cd "$(dirname "$0")/.."
ADAPTER=${1:-runs/sft-lora}
MODEL="$(scripts/fetch-model.sh)"
cargo build --release --quiet
BIN=target/release/temper
[ -x "$BIN" ] || BIN="${CARGO_TARGET_DIR:-target}/release/temper"
python3 - "$BIN" "$MODEL" "$ADAPTER" <<'PY'
import json, re, subprocess, sys
binary, model, adapter = sys.argv[1:]
rows = [json.loads(l) for l in open("examples/data/arith_test.jsonl")]
for label, extra in [("base", []), ("base + adapter", ["--adapter", adapter])]:
    fmt = right = stated = 0
    for r in rows:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        want = a.split("#### ")[1]
        out = subprocess.run([binary, "generate", "--model", model, *extra, "--chat", "--prompt", q,
                              "--max-new-tokens", "40", "--json"], capture_output=True, text=True, check=True)
        text = json.loads(out.stdout)["text"]
        m = re.search(r"#### (-?\d+)", text)
        fmt += m is not None
        right += m is not None and m.group(1) == want
        s = re.search(r"=\s*(-?\d+)", text)
        stated += s is not None and s.group(1) == want
    n = len(rows)
    print(f"{label:15} format {fmt}/{n}, correct {right}/{n}, right sum after '=' {stated}/{n}")
PY
