#!/usr/bin/env bash
# Runs the Python, Kotlin/JVM and Swift test suites through the GENERATED UniFFI bindings, against the
# host debug build of libto_device_crypto.so (TDC_BINDINGS_PROFILE=release: the release build, as
# scripts/bench.sh does for row 7).
#
#   scripts/test-bindings.sh [python] [kotlin] [swift]    (default: all three)
#
# Toolchains come from scripts/lib/toolchains.sh (cached outside the repo). Prints per-suite test
# counts, wall time and the per-event FFI overhead each language measured, then one summary line
# "N passed, M failed"; exits non-zero on any failure. Each measured overhead is also printed as a
# machine-readable row for scripts/bench.sh:
#   @row<TAB>7-LANG<TAB>name<TAB>foreign_us<TAB>rust_us<TAB>ours/base<TAB>-
# where rust_us is $TDC_FFI_BASELINE_US (the same call from Rust, benches/ratios.rs), or `-`.
#
# Python and Swift use the committed bindings (checked fresh first). Kotlin is compiled from a copy
# generated with uniffi-jvm.toml, because the committed copy uses Android's SystemCleaner.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/to-device-crypto/target}
PROFILE=${TDC_BINDINGS_PROFILE:-debug}
case $PROFILE in debug | release) ;; *) echo "TDC_BINDINGS_PROFILE must be debug or release, not '$PROFILE'" >&2; exit 2 ;; esac
LIBDIR=$CARGO_TARGET_DIR/$PROFILE
LIB=$LIBDIR/libto_device_crypto.so
# shellcheck source=scripts/lib/toolchains.sh
source "$ROOT/scripts/lib/toolchains.sh"

suites=("$@")
((${#suites[@]})) || suites=(python kotlin swift)
for s in "${suites[@]}"; do
	case $s in python | kotlin | swift) ;; *) echo "unknown suite: $s (python|kotlin|swift)" >&2; exit 2 ;; esac
done

# The throwing-listener cases make UniFFI panic inside the (isolated) listener call; a backtrace per
# expected panic is just noise.
unset RUST_BACKTRACE

cd "$ROOT"
# Also builds the debug cdylib and uniffi-bindgen (reused when up to date); the bindgen reads the
# same metadata from a release library.
"$ROOT/scripts/generate-bindings.sh" --check
if [[ $PROFILE == release ]]; then
	echo "test-bindings: building the release library (fat LTO: about a minute when src/ changed)"
	cargo build --quiet --release --lib
fi
[[ -f $LIB ]] || { echo "test-bindings: $LIB was not built" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

total_passed=0
total_failed=0
summary=()
rows=()

# record SUITE RUN FAILED SECONDS LOG
record() {
	local suite=$1 run=$2 failed=$3 secs=$4 log=$5 overhead
	overhead=$(grep -o 'overhead: [0-9.]* us/event' "$log" | head -1 | sed 's/overhead: //') || true
	total_passed=$((total_passed + run - failed))
	total_failed=$((total_failed + failed))
	summary+=("$(printf '%-7s %2d tests, %d failed, %6.1f s, decrypt_to_device_event %s' \
		"$suite" "$run" "$failed" "$secs" "${overhead:-n/a}")")
	if [[ -n $overhead ]]; then
		local lang
		case $suite in python) lang=Python ;; kotlin) lang=Kotlin/JVM ;; *) lang=Swift ;; esac
		rows+=("$(printf '@row\t7-%s\t7 FFI decrypt_to_device_event, %s / Rust (%s lib)\t%s\t%s\tours/base\t-' \
			"$suite" "$lang" "$PROFILE" "${overhead% us/event}" "${TDC_FFI_BASELINE_US:--}")")
	fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

run_python() {
	tdc_ensure_python || return 1
	local dir=$WORK/python log=$WORK/python.log start run failed
	# The package as the wheel lays it out: hand-written __init__.py, generated _ffi.py, the library.
	mkdir -p "$dir/to_device_crypto"
	cp bindings/python/to_device_crypto/*.py "$LIB" "$dir/to_device_crypto/"
	cp bindings/python/test_bindings.py "$dir/"
	start=$(now)
	(cd "$dir" && "$TDC_PYTHON" test_bindings.py) 2>&1 | tee "$log" || true
	read -r run failed < <(sed -n 's/^python: \([0-9]*\) tests, \([0-9]*\) failed$/\1 \2/p' "$log")
	[[ -n ${run:-} ]] || { run=1 failed=1; }
	record python "$run" "$failed" "$(elapsed "$start")" "$log"
}

run_kotlin() {
	tdc_ensure_kotlin || return 1
	local dir=$WORK/kotlin log=$WORK/kotlin.log start run failed cp
	mkdir -p "$dir"
	start=$(now)
	"$CARGO_TARGET_DIR/debug/uniffi-bindgen" generate "$LIB" --language kotlin --out-dir "$dir/gen" \
		--config uniffi-jvm.toml --no-format >/dev/null
	cp=$TDC_JNA_JAR:$TDC_COROUTINES_JAR
	echo "kotlin: compiling (kotlinc, ~20 s)"
	if "$TDC_KOTLINC" -nowarn -cp "$cp" -d "$dir/tests.jar" \
		"$dir"/gen/org/matrix/todevicecrypto/*.kt \
		bindings/kotlin/src/main/kotlin/org/matrix/todevicecrypto/FailureFlow.kt \
		bindings/kotlin/src/test/kotlin/org/matrix/todevicecrypto/*.kt 2>&1 | tee "$log"; then
		java -Djna.library.path="$LIBDIR" -cp "$cp:$TDC_KOTLIN_STDLIB:$dir/tests.jar" \
			org.matrix.todevicecrypto.BindingsTestKt 2>&1 | tee -a "$log" || true
	fi
	read -r run failed < <(sed -n 's/^kotlin: \([0-9]*\) tests, \([0-9]*\) failed$/\1 \2/p' "$log")
	[[ -n ${run:-} ]] || { run=1 failed=1; }
	record kotlin "$run" "$failed" "$(elapsed "$start")" "$log"
}

run_swift() {
	tdc_ensure_swift || return 1
	local scratch=${TDC_SWIFT_SCRATCH:-$HOME/.cache/to-device-crypto/swift-scratch} log=$WORK/swift.log start run failed
	mkdir -p "$scratch"
	start=$(now)
	TDC_SWIFT_EXTRA_BINDS=$CARGO_TARGET_DIR:$scratch tdc_in_swift_chroot "$ROOT/bindings/swift" \
		"LD_LIBRARY_PATH=$LIBDIR swift test --disable-swift-testing --scratch-path $scratch -Xlinker -L$LIBDIR" \
		2>&1 | tee "$log" || true
	read -r run failed < <(sed -n 's/^[[:space:]]*Executed \([0-9]*\) tests\{0,1\}, with \([0-9]*\) failures\{0,1\}.*/\1 \2/p' "$log" | tail -1)
	[[ -n ${run:-} ]] || { run=1 failed=1; }
	echo "swift: $run tests, $failed failed"
	record swift "$run" "$failed" "$(elapsed "$start")" "$log"
}

for s in "${suites[@]}"; do
	echo "=== $s ==="
	"run_$s" || { echo "test-bindings: the $s toolchain is not available" >&2; record "$s" 1 1 0 /dev/null; }
done

echo
echo "=== summary ($PROFILE library) ==="
printf '%s\n' "${summary[@]}"
echo "$total_passed passed, $total_failed failed"
((${#rows[@]} == 0)) || printf '%s\n' "${rows[@]}"
((total_failed == 0))
