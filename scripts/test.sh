#!/usr/bin/env bash
# The test suite, as CI runs it: system libraries, the real model for the SmolLM2 parity test,
# then every crate's tests in release mode (the parity tests run real forwards), then the
# review page in headless Chromium against the binary those tests built.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests
scripts/fetch-model.sh >/dev/null
cargo test --workspace --release "$@"
cargo build --release --quiet
TEMPER_BIN="${CARGO_TARGET_DIR:-target}/release/temper" node --test tests/review/review.test.mjs
