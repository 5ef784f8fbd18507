#!/usr/bin/env bash
# The one test command (README, .ci/run): formatting, lints, every cargo test, fuzzing, interop,
# the upstream change set (patched matrix-sdk-crypto, its tests, sdk-olm, the comparison),
# the shipped CLI's and the mobile library's contents, the generated bindings' freshness, the
# Swift, Kotlin and Python binding suites, and the Python wheel (built, installed in a fresh venv,
# running the README's example). Installs what is missing and caches it outside the repo, in
# ~/.cache/to-device-crypto.
#
# Nothing is skipped silently: a script that is missing or not executable is an error, and an
# opt-out (TDC_SKIP_FUZZ=1, TDC_SKIP_UPSTREAM=1) prints SKIPPED and changes the last line, which then does not say
# "all checks passed". The end prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."

export TDC_CACHE="${TDC_CACHE:-$HOME/.cache/to-device-crypto}"
# One target dir for every step and every run: the crate is built once per profile.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TDC_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

started=$SECONDS
# What git sees before the run: the run must leave it as it found it (a lock file or generated file
# that a step rewrites would otherwise go unnoticed in a clean-clone CI run).
tree_before=$(git status --porcelain=v1 --untracked-files=all 2>/dev/null || true)
timings=()
skipped=()
current=""
summary() {
    local status=$?
    if [[ -n $current ]]; then
        timings+=("$(printf '%-48s %6s s  FAILED' "$current" "$((SECONDS - step_started))")")
        # A step that did not finish failed, whatever ended the run.
        ((status != 0)) || status=1
    fi
    echo "==> step timings"
    if ((${#timings[@]})); then printf '    %s\n' "${timings[@]}"; fi
    if ((status != 0)); then
        echo "FAILED after $((SECONDS - started)) s"
    elif ((${#skipped[@]})); then
        echo "checks passed in $((SECONDS - started)) s, but ${#skipped[@]} SKIPPED (${skipped[*]}): not a full run"
    else
        echo "all checks passed in $((SECONDS - started)) s"
    fi
    exit "$status"
}
trap summary EXIT
# A signal ends the run as a failure (with the summary), never as a pass.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

step() {
    local name=$1
    shift
    current=$name
    step_started=$SECONDS
    echo "==> $name"
    "$@"
    echo "<== $name ($((SECONDS - step_started)) s)"
    timings+=("$(printf '%-48s %6s s' "$name" "$((SECONDS - step_started))")")
    current=""
}

skip() {
    local name=$1 why=$2
    echo "==> SKIPPED: $name ($why)"
    skipped+=("$name")
    timings+=("$(printf '%-48s %8s  SKIPPED (%s)' "$name" - "$why")")
}

# Every script the command runs must be there and executable: a lost executable bit must fail the
# run, not quietly drop a step.
for script in fuzz.sh interop.sh upstream.sh check-shipped-cli.sh report-size.sh generate-bindings.sh test-bindings.sh \
    test-wheel.sh; do
    if [[ ! -e scripts/$script ]]; then
        echo "error: scripts/$script is missing" >&2
        exit 1
    fi
    if [[ ! -x scripts/$script ]]; then
        echo "error: scripts/$script is not executable (git update-index --chmod=+x scripts/$script)" >&2
        exit 1
    fi
done

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "error: cargo $component is missing; install it with 'rustup component add $component'" >&2
        exit 1
    fi
done

step "format" cargo fmt --all --check
# Tests, examples and benches build with the `testing` feature; the library and binaries as they
# ship (default features, and the mobile libraries' none) are linted on their own, so that code
# only the shipped configurations compile is linted too.
step "clippy (all targets, testing)" cargo clippy --workspace --all-targets --locked -- -D warnings
step "clippy (shipped library and CLI)" cargo clippy --locked --lib --bins -- -D warnings
step "clippy (mobile library, no default features)" \
    cargo clippy --locked --lib --no-default-features -- -D warnings
# --show-output: the crash and two-process tests print their kills, phases, lock hand-overs.
step "cargo tests" cargo test --workspace --locked -- --show-output
if [[ ${TDC_SKIP_FUZZ:-0} == 1 ]]; then
    skip "fuzz" "TDC_SKIP_FUZZ=1"
else
    step "fuzz (30 s per target)" scripts/fuzz.sh 30
fi
step "interop with matrix-sdk-crypto 0.18" scripts/interop.sh
# After interop, whose build of our CLI it reuses for the side-by-side comparison.
if [[ ${TDC_SKIP_UPSTREAM:-0} == 1 ]]; then
    skip "upstream" "TDC_SKIP_UPSTREAM=1"
else
    step "upstream: patched matrix-sdk-crypto, sdk-olm" scripts/upstream.sh
fi
step "shipped CLI has no test seams" scripts/check-shipped-cli.sh
step "mobile library: no build tools linked, size" scripts/report-size.sh
step "generated bindings are up to date" scripts/generate-bindings.sh --check
step "binding suites (Swift, Kotlin, Python)" scripts/test-bindings.sh
step "Python wheel: fresh venv, README example" scripts/test-wheel.sh
tree_unchanged() {
    local after
    after=$(git status --porcelain=v1 --untracked-files=all 2>/dev/null || true)
    if [[ $after != "$tree_before" ]]; then
        echo "error: the run changed the working tree:" >&2
        diff <(echo "$tree_before") <(echo "$after") >&2 || true
        return 1
    fi
}
step "the run left the working tree as it found it" tree_unchanged
