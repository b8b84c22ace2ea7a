#!/usr/bin/env bash
# Installs what building Temper needs beyond Rust: Debian's OpenBLAS (the default CPU backend,
# `ndarray`, links it). With --tests, also what the test suite needs: Debian's Chromium and
# Node.js, and the review page's test packages (playwright-core, which drives that Chromium).
# Idempotent; uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
dpkg -s libopenblas-dev >/dev/null 2>&1 || missing+=(libopenblas-dev pkg-config)
if [ "${1:-}" = "--tests" ]; then
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} ..." >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi
if [ "${1:-}" = "--tests" ] && [ ! -d tests/review/node_modules/playwright-core ]; then
  echo "installing the review test's npm packages ..." >&2
  (cd tests/review && npm ci --silent --no-audit --no-fund) >&2
fi
