#!/usr/bin/env bash
# Builds the Python wheel of the bindings: the package to_device_crypto/ (hand-written __init__.py,
# generated _ffi.py from bindings/python/to_device_crypto) with the stripped release
# libto_device_crypto.so inside. No dependencies; `pip install <wheel>` and `import to_device_crypto`.
#
#   scripts/build-wheel.sh [OUT_DIR]      (default: $CARGO_TARGET_DIR/wheels)
#
# Prints the wheel's path as its last line. The library is built exactly as scripts/report-size.sh
# builds it (`cargo rustc --profile release --no-default-features --lib --crate-type cdylib`, in
# $CARGO_TARGET_DIR/mobile-size: a shipped library, without the CLI's crates), so whichever runs
# second reuses the other's build instead of rebuilding (fat LTO: minutes from scratch, ~1 min after a
# change in src/). The wheel itself is written by scripts/lib/build_wheel.py (no maturin: the
# library and the generated module already exist; a wheel is a zip with METADATA, WHEEL, RECORD).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TDC_CACHE=${TDC_CACHE:-$HOME/.cache/to-device-crypto}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TDC_CACHE/target}
OUT=${1:-$CARGO_TARGET_DIR/wheels}
# report-size.sh's target dir (its own: this package's cdylib is written without a hash, and
# another build of the library in the same directory would overwrite it unnoticed).
export CARGO_TARGET_DIR=$CARGO_TARGET_DIR/mobile-size
PYTHON=${TDC_PYTHON:-$(command -v python3)} || { echo "build-wheel: python3 not found" >&2; exit 1; }
command -v strip >/dev/null 2>&1 || { echo "build-wheel: strip (binutils) not found" >&2; exit 1; }

cd "$ROOT"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[[ -n $version ]] || { echo "build-wheel: no version in Cargo.toml" >&2; exit 1; }

echo "build-wheel: release library (cargo rustc --profile release --no-default-features --crate-type cdylib)" >&2
cargo rustc --quiet --locked --profile release --no-default-features --lib --crate-type cdylib
lib=$CARGO_TARGET_DIR/release/libto_device_crypto.so
[[ -f $lib ]] || { echo "build-wheel: $lib was not built" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Stripped as the app packages strip it: the exported UniFFI symbols stay (they are dynamic).
cp "$lib" "$tmp/libto_device_crypto.so"
strip --strip-unneeded "$tmp/libto_device_crypto.so"

"$PYTHON" scripts/lib/build_wheel.py --package bindings/python/to_device_crypto \
	--lib "$tmp/libto_device_crypto.so" --version "$version" --out "$OUT"
