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
# A step left out is said so twice: where it would have run, and on the final line.
skipped=()
skip() {
    echo "==> $1: SKIPPED ($2)"
    skipped+=("$1 ($2)")
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
else
    skip "fuzz" "TDC_SKIP_FUZZ=1"
fi
step "interop with matrix-sdk-crypto 0.18" scripts/interop.sh
# After interop: it reuses interop's build of our CLI for the comparison.
if [[ ${TDC_SKIP_UPSTREAM:-0} != 1 ]]; then
    step "upstream: patched matrix-sdk-crypto, sdk-olm, the side-by-side comparison" scripts/upstream.sh
else
    skip "upstream" "TDC_SKIP_UPSTREAM=1"
fi
step "generated bindings are up to date" scripts/generate-bindings.sh --check
step "binding suites (Swift, Kotlin, Python)" scripts/test-bindings.sh
step "Python wheel: fresh venv, README example" scripts/test-wheel.sh
if [[ ${#skipped[@]} -gt 0 ]]; then
    echo "checks passed in $((SECONDS - started)) s, SKIPPED: $(IFS=,; echo "${skipped[*]}" | sed 's/,/, /g')"
else
    echo "all checks passed in $((SECONDS - started)) s"
fi
