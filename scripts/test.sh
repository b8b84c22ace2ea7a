#!/usr/bin/env bash
# The test suite, as CI runs it: system library, the real model for the SmolLM2 parity test,
# then every crate's tests in release mode (the parity tests run real forwards).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh >/dev/null
cargo test --workspace --release "$@"
