#!/usr/bin/env bash
# Generates the UniFFI bindings (Swift, Kotlin, Python) from the debug cdylib into bindings/.
# The generated code is committed.
#
#   scripts/generate-bindings.sh           regenerate bindings/ in place
#   scripts/generate-bindings.sh --check   generate into a temp dir and fail if bindings/ is stale
#
# Configuration comes from uniffi.toml at the crate root (UniFFI 0.32 discovers it itself; its
# --config flag now takes a *global* config file, which we do not need here).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/to-device-crypto/target}
LIB=$CARGO_TARGET_DIR/debug/libto_device_crypto.so

check=false
case ${1:-} in
--check) check=true ;;
"") ;;
*)
	echo "usage: $0 [--check]" >&2
	exit 2
	;;
esac

cd "$ROOT"
cargo build --quiet --lib --bin uniffi-bindgen
BINDGEN=$CARGO_TARGET_DIR/debug/uniffi-bindgen

# The committed layout, relative to the output root.
SWIFT_SRC=swift/Sources/ToDeviceCrypto
SWIFT_FFI=swift/Sources/ToDeviceCryptoFFI
KOTLIN_SRC=kotlin/src/main/kotlin
# The Python package: a hand-written __init__.py (atexit hook, re-exports) over the generated _ffi.py.
PYTHON_SRC=python/to_device_crypto

generate() { # OUT_ROOT
	local out=$1 tmp
	tmp=$(mktemp -d)
	mkdir -p "$out/$SWIFT_SRC" "$out/$SWIFT_FFI" "$out/$KOTLIN_SRC" "$out/$PYTHON_SRC"
	"$BINDGEN" generate "$LIB" --language swift --out-dir "$tmp/swift" --no-format >/dev/null
	"$BINDGEN" generate "$LIB" --language kotlin --out-dir "$out/$KOTLIN_SRC" --no-format >/dev/null
	"$BINDGEN" generate "$LIB" --language python --out-dir "$tmp/python" --no-format >/dev/null
	mv "$tmp/swift/ToDeviceCrypto.swift" "$out/$SWIFT_SRC/"
	mv "$tmp/python/to_device_crypto.py" "$out/$PYTHON_SRC/_ffi.py"
	mv "$tmp/swift/ToDeviceCryptoFFI.h" "$tmp/swift/ToDeviceCryptoFFI.modulemap" "$out/$SWIFT_FFI/"
	# SwiftPM's system-library target (Linux) needs `module.modulemap` and the link directive; the
	# XCFramework build uses the generated ToDeviceCryptoFFI.modulemap as it is.
	sed 's/^\(    export \*\)$/\1\n    link "to_device_crypto"/' "$out/$SWIFT_FFI/ToDeviceCryptoFFI.modulemap" \
		>"$out/$SWIFT_FFI/module.modulemap"
	grep -q 'link "to_device_crypto"' "$out/$SWIFT_FFI/module.modulemap" || {
		echo "generate-bindings: could not add the link directive to module.modulemap" >&2
		return 1
	}
	rm -rf "$tmp"
}

# The generated files we own (hand-written helpers and tests next to them are not touched).
GENERATED=(
	"$SWIFT_SRC/ToDeviceCrypto.swift"
	"$SWIFT_FFI/ToDeviceCryptoFFI.h"
	"$SWIFT_FFI/ToDeviceCryptoFFI.modulemap"
	"$SWIFT_FFI/module.modulemap"
	"$KOTLIN_SRC/org/matrix/todevicecrypto/to_device_crypto.kt"
	"$PYTHON_SRC/_ffi.py"
)

if $check; then
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
	generate "$out"
	stale=()
	for f in "${GENERATED[@]}"; do
		[[ -f $out/$f ]] || { echo "generate-bindings: bindgen no longer produces $f" >&2; exit 1; }
		cmp -s "$out/$f" "bindings/$f" || stale+=("bindings/$f")
	done
	if ((${#stale[@]})); then
		echo "generate-bindings: STALE generated bindings (the Rust FFI changed):" >&2
		for f in "${stale[@]}"; do
			echo "  $f" >&2
			diff -u "$f" "$out/${f#bindings/}" | head -20 >&2 || true
		done
		echo "Run scripts/generate-bindings.sh and commit the result." >&2
		exit 1
	fi
	echo "generate-bindings: bindings/ is up to date (${#GENERATED[@]} generated files)"
else
	generate "$ROOT/bindings"
	printf 'generated bindings/%s\n' "${GENERATED[@]}"
fi
