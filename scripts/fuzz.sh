#!/usr/bin/env bash
# Fuzzes the hostile-input surfaces (see docs/FUZZING.md): scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each cargo-fuzz target of fuzz/ for SECONDS (default 30) with a 2 GB RSS limit and a
# per-input timeout, seeded from real events (fuzz/seeds, written by the seed generator), prints
# the exec count and result per target, and exits non-zero on any crash, printing the artifact.
#
# Environment: FUZZ_JOBS (targets run at once, default 1), FUZZ_SANITIZER (none|address, default
# none: safe Rust, twice the exec rate), FUZZ_TIMEOUT (seconds per input, default 10),
# FUZZ_REGENERATE_SEEDS=1 (rewrite fuzz/seeds, including the recorded machine), FUZZ_LOG_DIR (keep
# the libFuzzer logs there).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(decrypt keys_query keys_upload sync_input)
jobs=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-none}
timeout=${FUZZ_TIMEOUT:-10}

export TDC_CACHE="${TDC_CACHE:-$HOME/.cache/to-device-crypto}"
# The fuzz package is its own workspace with its own target dir (instrumented builds must not
# invalidate the main crate's).
export CARGO_TARGET_DIR="$TDC_CACHE/fuzz-target"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# libFuzzer needs -Z flags: allowed on a stable toolchain with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1

started=$SECONDS
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd fuzz
if [[ ! -f seeds/state.json || ${FUZZ_REGENERATE_SEEDS:-0} == 1 ]]; then
    echo "==> generating seeds (fuzz/seeds)"
    rm -rf corpus/decrypt # encrypted for the previous recorded machine
    cargo run --quiet --example seed -- seeds
fi
# Fresh real bodies every run for the targets that do not depend on the recorded machine.
fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
cargo run --quiet --example seed -- "$fresh" 2>"$fresh/seed.log" || {
    cat "$fresh/seed.log" >&2
    exit 1
}
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    for f in seeds/"$target"/*; do
        [[ -e "corpus/$target/$(basename "$f")" ]] || cp "$f" "corpus/$target/"
    done
    if [[ $target != decrypt ]]; then
        for f in "$fresh/$target"/*; do cp "$f" "corpus/$target/fresh-$(basename "$f")"; done
    fi
done

echo "==> building ${targets[*]} (sanitizer: $sanitizer)"
for target in "${targets[@]}"; do
    cargo fuzz build --sanitizer "$sanitizer" "$target" >/dev/null 2>build.log || {
        cat build.log >&2
        exit 1
    }
done
rm -f build.log
# Run the binaries just built (not `cargo fuzz run`, which rebuilds first): every target fuzzes
# the same snapshot of the sources, even while they are being edited.
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="$CARGO_TARGET_DIR/$host/release"

if [[ -n ${FUZZ_LOG_DIR:-} ]]; then
    logs=$FUZZ_LOG_DIR
    mkdir -p "$logs"
else
    logs=$(mktemp -d)
    trap 'rm -rf "$fresh" "$logs"' EXIT
fi
run_target() {
    local target=$1
    nice -n 10 "$bin_dir/$target" "corpus/$target" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -timeout="$timeout" -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/" >"$logs/$target.log" 2>&1
}

failed=0
report() {
    local target=$1 status=$2 log="$logs/$1.log"
    local execs
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    local cov
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    if [[ $status -eq 0 ]]; then
        printf '%-12s ok     %10s execs  %s\n' "$target" "${execs:-?}" "$cov"
    else
        failed=1
        printf '%-12s FAILED %10s execs  (exit %s)\n' "$target" "${execs:-?}" "$status"
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written to' "$log" | sed 's/^/    /' >&2 || true
        tail -n 40 "$log" | sed 's/^/    | /' >&2
        local artifact
        artifact=$(grep -o "Test unit written to [^ ]*" "$log" | tail -1 | sed 's/Test unit written to //')
        if [[ -n $artifact ]]; then
            echo "    artifact: fuzz/$artifact (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $target $artifact)" >&2
        fi
    fi
}

echo "==> fuzzing ${#targets[@]} target(s) for $seconds s each, $jobs at a time"
pending=("${targets[@]}")
while [[ ${#pending[@]} -gt 0 ]]; do
    batch=("${pending[@]:0:$jobs}")
    pending=("${pending[@]:$jobs}")
    pids=()
    for target in "${batch[@]}"; do
        run_target "$target" &
        pids+=($!)
    done
    for i in "${!batch[@]}"; do
        status=0
        wait "${pids[$i]}" || status=$?
        report "${batch[$i]}" "$status"
    done
done
echo "fuzzing finished in $((SECONDS - started)) s"
exit "$failed"
