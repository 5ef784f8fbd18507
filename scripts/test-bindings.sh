#!/usr/bin/env bash
# Runs the Python, Kotlin/JVM and Swift test suites through the GENERATED UniFFI bindings, against the
# host debug build of libto_device_crypto.so (TDC_BINDINGS_PROFILE=release: the release build, as
# scripts/bench.sh does for row 7).
#
#   scripts/test-bindings.sh [python] [kotlin] [swift]    (default: all three)
#
# A suite passes only if every process it runs exits with status 0, it reports no failed test, and it
# ran at least MIN_TESTS[suite] tests (below): a crash, a runner that stops early, a count that cannot
# be read, or deleted tests all fail the run. The Swift and Kotlin suites also compile and run the
# README's adopter snippets (`<!-- snippet: swift-adopt -->`, `kotlin-adopt`), extracted with
# scripts/lib/readme_snippet.py.
#
# Toolchains come from scripts/lib/toolchains.sh (cached outside the repo). Prints per-suite test
# counts, wall time and the per-event FFI overhead each language measured, then one summary line
# "N passed, M failed"; exits non-zero if any suite failed. Each measured overhead is also printed as
# a machine-readable row for scripts/bench.sh:
#   @row<TAB>7-LANG<TAB>name<TAB>foreign_us<TAB>rust_us<TAB>ours/base<TAB>-
# where rust_us is $TDC_FFI_BASELINE_US (the same call from Rust, benches/ratios.rs), or `-`.
#
# Python and Swift use the committed bindings (checked fresh first). Kotlin is compiled from a copy
# generated with uniffi-jvm.toml, because the committed copy uses Android's SystemCleaner.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TDC_CACHE=${TDC_CACHE:-$HOME/.cache/to-device-crypto}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TDC_CACHE/target}
PROFILE=${TDC_BINDINGS_PROFILE:-debug}
case $PROFILE in debug | release) ;; *) echo "TDC_BINDINGS_PROFILE must be debug or release, not '$PROFILE'" >&2; exit 2 ;; esac
LIBDIR=$CARGO_TARGET_DIR/$PROFILE
LIB=$LIBDIR/libto_device_crypto.so
# shellcheck source=scripts/lib/toolchains.sh
source "$ROOT/scripts/lib/toolchains.sh"

# The fewest tests each suite must run (its count today). Raise it with every new test; a suite that
# reports fewer fails even if nothing failed.
declare -A MIN_TESTS=([python]=16 [kotlin]=16 [swift]=17)

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
	# The same command as scripts/report-size.sh and scripts/build-wheel.sh: one release cdylib,
	# built once for all three (and the one the apps ship, unlike `cargo build --lib`'s).
	echo "test-bindings: building the release library (fat LTO: about a minute when src/ changed)"
	cargo rustc --quiet --locked --profile release --lib --crate-type cdylib
fi
[[ -f $LIB ]] || { echo "test-bindings: $LIB was not built" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

total_passed=0
total_failed=0
failed_suites=()
summary=()
rows=()

# run_logged LOG CMD...: runs CMD with its output on the terminal and appended to LOG, and returns
# CMD's own exit status (not tee's). Call it as `run_logged ... || rc=$?`.
run_logged() {
	local log=$1
	shift
	"$@" 2>&1 | tee -a "$log"
	return "${PIPESTATUS[0]}"
}

# record SUITE STATUS RUN FAILED SECONDS LOG: STATUS is the first non-zero exit status of the suite's
# processes (0 if none); RUN and FAILED are the counts it printed (empty if it printed none).
record() {
	local suite=$1 status=$2 run=$3 failed=$4 secs=$5 log=$6 overhead problems=()
	local min=${MIN_TESTS[$suite]}
	((status == 0)) || problems+=("exit status $status")
	if [[ -z $run || -z $failed ]]; then
		problems+=("no test count")
		run=0 failed=0
	fi
	((failed == 0)) || problems+=("$failed failed")
	((run >= min)) || problems+=("$run tests run, fewer than the minimum of $min")
	overhead=$(sed -n 's/.*overhead: \([0-9.]*\) us\/event.*/\1/p' "$log" | head -1)
	total_passed=$((total_passed + run - failed))
	total_failed=$((total_failed + failed))
	local verdict=ok
	if ((${#problems[@]})); then
		verdict="FAILED: $(printf '%s; ' "${problems[@]}")"
		verdict=${verdict%; }
		failed_suites+=("$suite")
	fi
	summary+=("$(printf '%-7s %2d tests, %d failed, %6.1f s, decrypt_to_device_event %s us/event: %s' \
		"$suite" "$run" "$failed" "$secs" "${overhead:-n/a}" "$verdict")")
	if [[ -n $overhead ]]; then
		local lang
		case $suite in python) lang=Python ;; kotlin) lang=Kotlin/JVM ;; *) lang=Swift ;; esac
		rows+=("$(printf '@row\t7-%s\t7 FFI decrypt_to_device_event, %s / Rust (%s lib)\t%s\t%s\tours/base\t-' \
			"$suite" "$lang" "$PROFILE" "$overhead" "${TDC_FFI_BASELINE_US:--}")")
	fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

run_python() {
	tdc_ensure_python || return 1
	local dir=$WORK/python log=$WORK/python.log start status=0 run failed
	# The package as the wheel lays it out: hand-written __init__.py, generated _ffi.py, the library.
	mkdir -p "$dir/to_device_crypto"
	cp bindings/python/to_device_crypto/*.py "$LIB" "$dir/to_device_crypto/"
	cp bindings/python/test_bindings.py "$dir/"
	: >"$log"
	start=$(now)
	(cd "$dir" && run_logged "$log" "$TDC_PYTHON" test_bindings.py) || status=$?
	run=$(sed -n 's/^python: \([0-9]*\) tests, [0-9]* failed$/\1/p' "$log" | tail -1)
	failed=$(sed -n 's/^python: [0-9]* tests, \([0-9]*\) failed$/\1/p' "$log" | tail -1)
	record python "$status" "$run" "$failed" "$(elapsed "$start")" "$log"
}

run_kotlin() {
	tdc_ensure_kotlin || return 1
	local dir=$WORK/kotlin log=$WORK/kotlin.log start status=0 run failed cp
	mkdir -p "$dir/readme"
	: >"$log"
	start=$(now)
	# The README's adopter snippet, compiled as a file of its own package (its imports are real).
	{
		echo "package org.matrix.todevicecrypto.readme"
		python3 scripts/lib/readme_snippet.py kotlin-adopt
	} >"$dir/readme/ReadmeSnippet.kt" || status=$?
	if ((status == 0)); then
		run_logged "$log" "$CARGO_TARGET_DIR/debug/uniffi-bindgen" generate "$LIB" --language kotlin \
			--out-dir "$dir/gen" --config uniffi-jvm.toml --no-format || status=$?
	fi
	cp=$TDC_JNA_JAR:$TDC_COROUTINES_JAR
	local -a tests
	mapfile -t tests < <(find bindings/kotlin/src/test/kotlin -name '*.kt' | sort)
	if ((status == 0)); then
		echo "kotlin: compiling (kotlinc, ~30 s)"
		run_logged "$log" "$TDC_KOTLINC" -nowarn -cp "$cp" -d "$dir/tests.jar" \
			"$dir"/gen/org/matrix/todevicecrypto/*.kt \
			bindings/kotlin/src/main/kotlin/org/matrix/todevicecrypto/FailureFlow.kt \
			"$dir/readme/ReadmeSnippet.kt" "${tests[@]}" || status=$?
	fi
	if ((status == 0)); then
		run_logged "$log" java -Djna.library.path="$LIBDIR" -cp "$cp:$TDC_KOTLIN_STDLIB:$dir/tests.jar" \
			org.matrix.todevicecrypto.BindingsTestKt || status=$?
	fi
	run=$(sed -n 's/^kotlin: \([0-9]*\) tests, [0-9]* failed$/\1/p' "$log" | tail -1)
	failed=$(sed -n 's/^kotlin: [0-9]* tests, \([0-9]*\) failed$/\1/p' "$log" | tail -1)
	record kotlin "$status" "$run" "$failed" "$(elapsed "$start")" "$log"
}

# sync_tree SRC DST: makes DST hold exactly SRC's files, copying only those whose content differs, so
# that unchanged files keep their inode and mtime (what SwiftPM compares to skip recompiling).
sync_tree() {
	local src=$1 dst=$2 f
	mkdir -p "$dst"
	while IFS= read -r -d '' f; do
		mkdir -p "$dst/$(dirname "$f")"
		cmp -s "$src/$f" "$dst/$f" || cp "$src/$f" "$dst/$f"
	done < <(cd "$src" && find . -type f -print0)
	while IFS= read -r -d '' f; do
		[[ -e $src/$f ]] || rm -f "$dst/$f"
	done < <(cd "$dst" && find . -type f -print0)
}

run_swift() {
	tdc_ensure_swift || return 1
	# A per-checkout copy of the package at a stable path, so that SwiftPM builds incrementally and
	# two checkouts testing at once do not share (and clobber) one build directory; the README's
	# adopter snippet joins its test target.
	local key base pkg scratch log=$WORK/swift.log start status=0 run failed
	key=$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)
	base=$TDC_CACHE/swift-test/$key
	pkg=$base/package
	scratch=$base/scratch
	mkdir -p "$WORK/swift" "$scratch"
	cp -R bindings/swift/Package.swift bindings/swift/Sources bindings/swift/Tests "$WORK/swift/"
	python3 scripts/lib/readme_snippet.py swift-adopt >"$WORK/swift/Tests/ToDeviceCryptoTests/ReadmeSnippet.swift" ||
		status=$?
	sync_tree "$WORK/swift" "$pkg"
	: >"$log"
	start=$(now)
	if ((status == 0)); then
		TDC_SWIFT_EXTRA_BINDS=$CARGO_TARGET_DIR:$scratch run_logged "$log" tdc_in_swift_chroot "$pkg" \
			"LD_LIBRARY_PATH=$LIBDIR swift test --disable-swift-testing --scratch-path $scratch -Xlinker -L$LIBDIR" ||
			status=$?
	fi
	read -r run failed < <(sed -n 's/^[[:space:]]*Executed \([0-9]*\) tests\{0,1\}, with \([0-9]*\) failures\{0,1\}.*/\1 \2/p' "$log" | tail -1; echo)
	echo "swift: ${run:-?} tests, ${failed:-?} failed"
	record swift "$status" "${run:-}" "${failed:-}" "$(elapsed "$start")" "$log"
}

for s in "${suites[@]}"; do
	echo "=== $s ==="
	"run_$s" || {
		echo "test-bindings: the $s toolchain is not available" >&2
		record "$s" 1 "" "" 0 /dev/null
	}
done

echo
echo "=== summary ($PROFILE library) ==="
printf '%s\n' "${summary[@]}"
echo "$total_passed passed, $total_failed failed"
((${#rows[@]} == 0)) || printf '%s\n' "${rows[@]}"
if ((${#failed_suites[@]})); then
	echo "test-bindings: FAILED: ${failed_suites[*]}" >&2
	exit 1
fi
