#!/usr/bin/env bash
# Builds ToDeviceCryptoFFI.xcframework for the Swift package (macOS with Xcode only):
#   iOS device (aarch64-apple-ios), iOS simulator (lipo aarch64-apple-ios-sim + x86_64-apple-ios) and
#   macOS (lipo aarch64-apple-darwin + x86_64-apple-darwin) static libraries, each with the generated
#   header and module map; then zips it and prints `swift package compute-checksum` for a
#   `.binaryTarget(name:url:checksum:)` release.
#
# The libraries use the size-optimised `release` profile (see Cargo.toml; PROFILE overrides) and
# no default features (no CLI, no bindings generator).
#
# Output: bindings/swift/ToDeviceCryptoFFI.xcframework and target/xcframework/ToDeviceCryptoFFI.xcframework.zip
# Checks everything it needs first and fails fast, naming everything that is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SWIFT_DIR=$ROOT/bindings/swift
FFI_DIR=$SWIFT_DIR/Sources/ToDeviceCryptoFFI
TARGETS=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/to-device-crypto/target}
LIB=libto_device_crypto.a
PROFILE=${PROFILE:-release}

missing=()
if [[ $(uname -s) != Darwin ]]; then
	missing+=("macOS: XCFrameworks can only be built on macOS with Xcode (this is $(uname -s))")
fi
command -v xcodebuild >/dev/null 2>&1 && xcodebuild -version >/dev/null 2>&1 ||
	missing+=("Xcode (xcodebuild; install Xcode and run xcode-select -s /Applications/Xcode.app)")
command -v lipo >/dev/null 2>&1 || missing+=("lipo (Xcode command line tools)")
command -v swift >/dev/null 2>&1 || missing+=("swift (for swift package compute-checksum)")
command -v zip >/dev/null 2>&1 || missing+=("zip")
if command -v rustup >/dev/null 2>&1; then
	installed=$(rustup target list --installed)
	for t in "${TARGETS[@]}"; do
		grep -qx "$t" <<<"$installed" || missing+=("Rust target $t (rustup target add $t)")
	done
else
	missing+=("rustup (to add the Apple Rust targets)")
fi
if ((${#missing[@]})); then
	echo "build-xcframework: cannot build here; missing:" >&2
	printf '  - %s\n' "${missing[@]}" >&2
	exit 1
fi

cd "$ROOT"
"$ROOT/scripts/generate-bindings.sh" --check

for t in "${TARGETS[@]}"; do
	# Only the staticlib: built alongside the rlib and cdylib it would not be LTO-ed (~10x larger).
	# No default features: without the CLI and the bindings generator (clap, uniffi_bindgen, goblin,
	# toml, cargo_metadata, weedle: about half of the staticlib's code before they were a feature).
	cargo rustc --profile "$PROFILE" --no-default-features --lib --crate-type staticlib --target "$t"
done

OUT=$CARGO_TARGET_DIR/xcframework
rm -rf "$OUT"
mkdir -p "$OUT/headers" "$OUT/ios-simulator" "$OUT/macos"
cp "$FFI_DIR/ToDeviceCryptoFFI.h" "$OUT/headers/"
cp "$FFI_DIR/ToDeviceCryptoFFI.modulemap" "$OUT/headers/module.modulemap"

lipo -create "$CARGO_TARGET_DIR/aarch64-apple-ios-sim/$PROFILE/$LIB" "$CARGO_TARGET_DIR/x86_64-apple-ios/$PROFILE/$LIB" \
	-output "$OUT/ios-simulator/$LIB"
lipo -create "$CARGO_TARGET_DIR/aarch64-apple-darwin/$PROFILE/$LIB" "$CARGO_TARGET_DIR/x86_64-apple-darwin/$PROFILE/$LIB" \
	-output "$OUT/macos/$LIB"

XCF=$SWIFT_DIR/ToDeviceCryptoFFI.xcframework
rm -rf "$XCF"
xcodebuild -create-xcframework \
	-library "$CARGO_TARGET_DIR/aarch64-apple-ios/$PROFILE/$LIB" -headers "$OUT/headers" \
	-library "$OUT/ios-simulator/$LIB" -headers "$OUT/headers" \
	-library "$OUT/macos/$LIB" -headers "$OUT/headers" \
	-output "$XCF"

(cd "$SWIFT_DIR" && zip -qry "$OUT/ToDeviceCryptoFFI.xcframework.zip" ToDeviceCryptoFFI.xcframework)
echo "xcframework: $XCF"
echo "zip:         $OUT/ToDeviceCryptoFFI.xcframework.zip"
echo "checksum:    $(cd "$SWIFT_DIR" && swift package compute-checksum "$OUT/ToDeviceCryptoFFI.xcframework.zip")"
