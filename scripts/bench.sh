#!/usr/bin/env bash
# shellcheck disable=SC2317 # the step_* functions are called indirectly, through run_step
# Prints ONE benchmark table: every row is a ratio of medians measured in the same run (absolute
# times on a shared machine are noise). Release builds (the profile that ships) throughout.
#
#   scripts/bench.sh [STEP...]    steps: ratios cli interop bindings (= python kotlin swift);
#                                 default all. Rows of the steps left out show as "not measured".
#
# Rows [the step that measures them]:
#   1   in-memory batch of 100 normal messages / raw-vodozemac floor               [ratios]
#   2   SQLite (synchronous=NORMAL) batch incl. commit / floor                     [ratios]
#   3   first pre-key message / raw inbound session + 1 signature check            [ratios]
#   4   100 SessionWedged, stalled failure-stream subscriber / none                [ratios]
#   4b  the same over the FFI adapter, blocked listener / none                     [ratios]
#   5   matrix-sdk-crypto 0.18 ÷ ours (4 lines: m.room_key, and the same content under a custom
#       type = decryption only; ours in memory and on SQLite; targets >= 10x / >= 5x)  [interop]
#   6   SQLite batch with 100 / 1,000 / 10,000 sessions in the store / 10 sessions  [ratios]
#   6   CLI decrypting 10,000 events: peak RSS and µs/event incl. start-up, no ratio  [cli]
#   7   Rust baseline: the FFI adapter's decrypt_to_device_event on a failing event  [ratios]
#   7   the same call from Python, Kotlin/JVM, Swift (the binding suites, against the RELEASE
#       library) ÷ the Rust baseline of this run                          [python, kotlin, swift]
#   8   matrix-sdk-crypto 0.18 (receive_sync_changes, memory) ÷ our CLI end to end: 2,000 pre-key
#       events of one session from one matrix-sdk-crypto device, `to-device-crypto decrypt` as a
#       process (start, open, commit, print, acknowledge); target >= 8x             [interop]
# Steps: ratios = cargo bench --bench ratios (benches/ratios.rs); cli = step_cli below;
# interop = scripts/interop.sh --bench (interop/benches/reference.rs, with the interop tests;
# row 8 runs the release CLI built here, interop/benches/cli_end_to_end.rs);
# python, kotlin, swift = TDC_BINDINGS_PROFILE=release scripts/test-bindings.sh LANG.
#
# Every source prints, next to its own human-readable output, one line per row:
#   @row<TAB>id<TAB>name<TAB>ours_us<TAB>base_us<TAB>ours/base|base/ours|-<TAB>target
# The ratios bench builds into $CARGO_TARGET_DIR/ratios-bench (see step_ratios), the CLI and the
# bindings' library into $CARGO_TARGET_DIR/release, interop into its own cached target dir.
# Each step's output is kept in $TDC_CACHE/bench-logs/STEP.log; scripts/lib/bench-table.py turns
# the @row lines into the table. A row whose step failed (or was skipped) shows as
# "not measured (reason)", and the script then exits non-zero (after printing the table), as it does
# when any step fails. Toolchains for Kotlin and Swift: scripts/lib/toolchains.sh (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
export TDC_CACHE="${TDC_CACHE:-$HOME/.cache/to-device-crypto}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TDC_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

all_steps=(ratios cli interop python kotlin swift)
selected=()
for arg in "$@"; do
    case $arg in
        ratios | cli | interop | python | kotlin | swift) selected+=("$arg") ;;
        bindings) selected+=(python kotlin swift) ;;
        *) echo "usage: scripts/bench.sh [ratios] [cli] [interop] [bindings|python|kotlin|swift]" >&2; exit 2 ;;
    esac
done
((${#selected[@]})) || selected=("${all_steps[@]}")

logs="$TDC_CACHE/bench-logs"
rm -rf -- "$logs"
mkdir -p -- "$logs"
status="$logs/status.tsv"
: >"$status"
started=$SECONDS

# The expected rows, in table order: id|step|name shown if it was not measured.
cat >"$logs/spec.txt" <<'EOF'
1|ratios|1 in-memory batch of 100 normal msgs / vodozemac floor
2|ratios|2 SQLite (synchronous=NORMAL) batch incl. commit / floor
3|ratios|3 first pre-key message / raw inbound session + 1 verify
4|ratios|4 100 SessionWedged, stalled subscriber / no subscriber
4b|ratios|4b same over FFI, listener blocked / no listener
5-roomkey-memory|interop|5 matrix-sdk-crypto ÷ ours, m.room_key, memory
5-roomkey-sqlite|interop|5 matrix-sdk-crypto ÷ ours, m.room_key, SQLite incl. commit
5-custom-memory|interop|5 matrix-sdk-crypto ÷ ours, custom type (decrypt only), memory
5-custom-sqlite|interop|5 matrix-sdk-crypto ÷ ours, custom type (decrypt only), SQLite incl. commit
6-100|ratios|6 SQLite batch, 100 sessions in store / 10 sessions
6-1000|ratios|6 SQLite batch, 1,000 sessions in store / 10 sessions
6-10000|ratios|6 SQLite batch, 10,000 sessions in store / 10 sessions
6-cli|cli|6 CLI, 10,000 events incl. start-up: peak RSS
7-rust|ratios|7 Rust baseline: FFI decrypt_to_device_event, failing event
7-python|python|7 FFI decrypt_to_device_event, Python / Rust (release lib)
7-kotlin|kotlin|7 FFI decrypt_to_device_event, Kotlin/JVM / Rust (release lib)
7-swift|swift|7 FFI decrypt_to_device_event, Swift / Rust (release lib)
8-cli|interop|8 matrix-sdk-crypto (memory) ÷ our CLI end to end, 2000 pre-key events
EOF

# Why a step failed, in one line, from its log.
failure_reason() { # LOG EXIT_CODE
    local log=$1 code=$2 line
    line=$(grep -m1 'toolchain is not available' "$log") ||
        line=$(grep -v '^@row' "$log" | grep -E 'tdc: ERROR|^error(\[|:)|panicked|[0-9]+ passed, [1-9][0-9]* failed' | tail -1) ||
        line=""
    line=${line//$'\t'/ }
    ((${#line} <= 100)) || line="${line:0:97}..."
    printf 'exit %s%s' "$code" "${line:+: $line}"
}

# run_step NAME CMD...: runs CMD (under set -e), its output shown and kept in $logs/NAME.log.
run_step() {
    local name=$1 log="$logs/$1.log" t0=$SECONDS code reason=""
    shift
    echo "==> bench: $name"
    set +e
    (set -e; "$@") 2>&1 | tee "$log"
    code=${PIPESTATUS[0]}
    set -e
    ((code == 0)) || reason=$(failure_reason "$log" "$code")
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - t0))" "$reason" "$log" >>"$status"
    echo "<== bench: $name (exit $code, $((SECONDS - t0)) s)"
}

# The ratios bench gets its own target dir inside the main one (as interop.sh's CLI does): a bench
# build unifies the dev-dependencies' features into shared dependencies (libc, smallvec), and since
# this package is also a cdylib its library is written unhashed, so `cargo bench` and the
# `cargo build --release` of the CLI and of the bindings' library would rebuild it in turn on
# every run (~1.5 min of fat-LTO relinking).
step_ratios() {
    CARGO_TARGET_DIR="$CARGO_TARGET_DIR/ratios-bench" cargo bench --locked --bench ratios
}

step_cli() {
    cargo build --locked --release --bin to-device-crypto
    local bin="$CARGO_TARGET_DIR/release/to-device-crypto" work="$logs/cli-work"
    mkdir -p "$work"
    "$bin" keys --store "$work/bob" --user-id @bob:example.org --device-id BOBPHONE >"$work/bob.json" 2>/dev/null
    local content
    content='{"algorithm":"m.megolm.v1.aes-sha2","room_id":"!r:example.org","session_key":"'$(printf 'A%.0s' $(seq 1 360))'"}'
    "$bin" encrypt --create --store "$work/alice" --user-id @alice:example.org --device-id ALICE \
        --recipient-keys "$work/bob.json" --type m.room_key --content "$content" --count 10000 \
        >"$work/events.json" 2>/dev/null
    python3 - "$bin" "$work" <<'PY'
import resource, subprocess, sys, time
binary, work = sys.argv[1], sys.argv[2]
start = time.monotonic()
out = subprocess.run([binary, "decrypt", "--store", f"{work}/bob", f"{work}/events.json"],
                     capture_output=True, check=True).stdout
seconds = time.monotonic() - start
peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
decrypted = out.count(b'"result":"decrypted"')
size_mib = len(open(f"{work}/events.json", "rb").read()) / 2**20
us = seconds * 1e6 / 10000
print(f"6 CLI decrypting 10,000 events ({size_mib:.1f} MiB input): {decrypted} decrypted, "
      f"peak RSS {peak_mib:.1f} MiB, {us:.1f} µs/event including start-up")
if decrypted != 10000:
    sys.exit(f"error: the CLI decrypted {decrypted} of 10000 events")
print(f"@row\t6-cli\t6 CLI, 10,000 events ({size_mib:.1f} MiB) incl. start-up: peak RSS {peak_mib:.1f} MiB"
      f"\t{us:.3f}\t-\t-\t-")
PY
    rm -rf -- "$work"
}

step_interop() {
    # Row 8 times the CLI as it ships: the release binary.
    cargo build --locked --release --bin to-device-crypto
    TDC_BENCH_CLI="$CARGO_TARGET_DIR/release/to-device-crypto" scripts/interop.sh --bench
}

# Row 7's base: the Rust call, from the ratios step of this run (empty if it did not run).
rust_baseline() {
    awk -F'\t' '$1 == "@row" && $2 == "7-rust" { v = $4 } END { print v }' "$logs/ratios.log" 2>/dev/null || true
}

step_binding() { # LANG
    TDC_BINDINGS_PROFILE=release TDC_FFI_BASELINE_US="$(rust_baseline)" scripts/test-bindings.sh "$1"
}

for step in "${all_steps[@]}"; do
    if [[ " ${selected[*]} " != *" $step "* ]]; then
        printf '%s\tskipped\t0\t\t-\n' "$step" >>"$status"
        continue
    fi
    case $step in
        ratios) run_step ratios step_ratios ;;
        cli) run_step cli step_cli ;;
        interop) run_step interop step_interop ;;
        *) run_step "$step" step_binding "$step" ;;
    esac
done

code=0
python3 scripts/lib/bench-table.py "$logs/spec.txt" "$status" "$logs"/*.log || code=$?
echo "bench: $((SECONDS - started)) s in all"
exit "$code"
