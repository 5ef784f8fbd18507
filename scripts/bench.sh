#!/usr/bin/env bash
# Prints the benchmark table: each row is a ratio of medians measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TDC_CACHE:-$HOME/.cache/to-device-crypto}/target}"
cargo bench --locked --bench ratios
