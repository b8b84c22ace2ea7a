#!/usr/bin/env bash
# Installs what building Temper needs beyond Rust: Debian's OpenBLAS (the default CPU backend,
# `ndarray`, links it). Idempotent; uses sudo when not root.
set -euo pipefail
if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing libopenblas-dev ..." >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas-dev pkg-config >&2
fi
