#!/usr/bin/env bash
# Interop with the reference implementation, matrix-sdk-crypto 0.18 (docs/INTEROP.md).
#   scripts/interop.sh           build the CLI and the interop tests (timed), run the tests
#   scripts/interop.sh --bench   also build (release) and run interop/benches/reference.rs
#   scripts/interop.sh --bless   rewrite the adversarial table in docs/INTEROP.md from this run
# interop/ is a separate Cargo package (its own workspace and Cargo.lock), built into a cached
# target dir outside the repo; a cold build takes minutes on 2 cores, a warm one seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${TDC_INTEROP_TARGET:-${TDC_CACHE:-$HOME/.cache/to-device-crypto}/interop-target}"

bench=0
bless=0
for arg in "$@"; do
    case "$arg" in
        --bench) bench=1 ;;
        --bless) bless=1 ;;
        *) echo "usage: scripts/interop.sh [--bench] [--bless]" >&2; exit 2 ;;
    esac
done

if [ -d "$CARGO_TARGET_DIR/debug/deps" ]; then state="warm"; else state="cold"; fi
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
summary=()
step() { summary+=("$1"); echo "interop: $1" >&2; }

# Our CLI binary as users build it (default features), for the separate-process tests
# (interop/tests/interop/cli.rs). It gets its own target dir inside the interop one: the main
# package is also a cdylib/staticlib, so cargo writes its library as an unhashed
# `deps/libto_device_crypto.rlib`, and the two workspaces (different features) would overwrite
# each other's copy and then link against the wrong one.
# shellcheck source=scripts/lib/shipped-cli.sh
source scripts/lib/shipped-cli.sh
if [ -d "$(tdc_shipped_cli_target)/debug/deps" ]; then cstate="warm"; else cstate="cold"; fi
t=$(now)
TO_DEVICE_CRYPTO_BIN=$(tdc_build_shipped_cli)
export TO_DEVICE_CRYPTO_BIN
step "build CLI (debug, $cstate): $(since "$t") s"

# Not --locked: interop/Cargo.lock also records the main package's dependencies (a path
# dependency), which other changes move; cargo then adjusts only those entries and keeps
# matrix-sdk-crypto and the rest pinned.
lock=()
t=$(now)
nice -n 10 cargo test "${lock[@]}" --quiet --manifest-path interop/Cargo.toml --no-run
step "build interop tests (debug, $state): $(since "$t") s"

t=$(now)
if [ "$bless" = 1 ]; then export INTEROP_BLESS=1; fi
cargo test "${lock[@]}" --manifest-path interop/Cargo.toml
step "run interop tests: $(since "$t") s"

if [ "$bench" = 1 ]; then
    if [ -d "$CARGO_TARGET_DIR/release/deps" ]; then rstate="warm"; else rstate="cold"; fi
    t=$(now)
    nice -n 10 cargo bench "${lock[@]}" --quiet --manifest-path interop/Cargo.toml --bench reference --no-run
    step "build benchmark (release, $rstate): $(since "$t") s"
    t=$(now)
    cargo bench "${lock[@]}" --manifest-path interop/Cargo.toml --bench reference
    step "run benchmark: $(since "$t") s"
fi

echo "interop timings (target dir $CARGO_TARGET_DIR):"
printf '  %s\n' "${summary[@]}"
