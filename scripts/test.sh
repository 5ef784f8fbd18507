#!/usr/bin/env bash
# The one test command (README, .ci/run): formatting, lints, every cargo test, the generated
# bindings' freshness, the Swift, Kotlin and Python binding suites, and the Python wheel (built,
# installed in a fresh venv, running the README's example). Installs what is missing
# and caches it outside the repo, in ~/.cache/to-device-crypto.
set -euo pipefail
cd "$(dirname "$0")/.."

export TDC_CACHE="${TDC_CACHE:-$HOME/.cache/to-device-crypto}"
# One target dir for every step and every run: the crate is built once per profile.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TDC_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

started=$SECONDS
step() {
    local name=$1
    shift
    local t0=$SECONDS
    echo "==> $name"
    "$@"
    echo "<== $name ($((SECONDS - t0)) s)"
}

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "error: cargo $component is missing; install it with 'rustup component add $component'" >&2
        exit 1
    fi
done

step "format" cargo fmt --all --check
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# --show-output: the crash test prints its kills, fail points, deliveries and re-emissions.
step "cargo tests" cargo test --workspace --locked -- --show-output
if [[ ${TDC_SKIP_FUZZ:-0} != 1 ]]; then
    step "fuzz (30 s per target)" scripts/fuzz.sh 30
fi
step "interop with matrix-sdk-crypto 0.18" scripts/interop.sh
step "upstream: patched matrix-sdk-crypto 0.19.1, sdk-olm and the side-by-side comparison" scripts/upstream.sh
if [[ -x scripts/generate-bindings.sh ]]; then
    step "generated bindings are up to date" scripts/generate-bindings.sh --check
fi
if [[ -x scripts/test-bindings.sh ]]; then
    step "binding suites (Swift, Kotlin, Python)" scripts/test-bindings.sh
fi
step "Python wheel: fresh venv, README example" scripts/test-wheel.sh
echo "all checks passed in $((SECONDS - started)) s"
