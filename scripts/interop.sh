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

# Our CLI binary, for the separate-process tests (interop/tests/interop/cli.rs).
t=$(now)
nice -n 10 cargo build --locked --quiet --manifest-path Cargo.toml --bin to-device-crypto
summary+=("build CLI (debug, $state): $(since "$t") s")
export TO_DEVICE_CRYPTO_BIN="$CARGO_TARGET_DIR/debug/to-device-crypto"

lock=()
[ -f interop/Cargo.lock ] && lock=(--locked)
t=$(now)
nice -n 10 cargo test "${lock[@]}" --quiet --manifest-path interop/Cargo.toml --no-run
summary+=("build interop tests (debug, $state): $(since "$t") s")

t=$(now)
if [ "$bless" = 1 ]; then export INTEROP_BLESS=1; fi
cargo test "${lock[@]}" --manifest-path interop/Cargo.toml
summary+=("run interop tests: $(since "$t") s")

if [ "$bench" = 1 ]; then
    if [ -d "$CARGO_TARGET_DIR/release/deps" ]; then rstate="warm"; else rstate="cold"; fi
    t=$(now)
    nice -n 10 cargo bench "${lock[@]}" --quiet --manifest-path interop/Cargo.toml --bench reference --no-run
    summary+=("build benchmark (release, $rstate): $(since "$t") s")
    t=$(now)
    cargo bench "${lock[@]}" --manifest-path interop/Cargo.toml --bench reference
    summary+=("run benchmark: $(since "$t") s")
fi

echo "interop timings (target dir $CARGO_TARGET_DIR):"
printf '  %s\n' "${summary[@]}"
