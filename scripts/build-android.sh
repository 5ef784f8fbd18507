#!/usr/bin/env bash
# Builds the Android library (AAR) of the Kotlin bindings:
#   1. cargo ndk: libto_device_crypto.so for arm64-v8a, armeabi-v7a and x86_64 into
#      bindings/kotlin/src/main/jniLibs/<abi>/
#   2. gradle assembleRelease in bindings/kotlin (AAR in bindings/kotlin/build/outputs/aar/)
#
# The libraries use the size-optimised `release` profile (see Cargo.toml; PROFILE overrides) and
# no default features (no CLI, no bindings generator).
#
# Needs: ANDROID_NDK_HOME (NDK 29), cargo-ndk (>= 3, for --profile), the three Rust Android targets,
# and gradle (or a gradle wrapper in bindings/kotlin) with ANDROID_HOME / ANDROID_SDK_ROOT. Checks all
# of it first and fails fast, naming everything that is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODULE=$ROOT/bindings/kotlin
ABIS=(arm64-v8a armeabi-v7a x86_64)
RUST_TARGETS=(aarch64-linux-android armv7-linux-androideabi x86_64-linux-android)
PROFILE=${PROFILE:-release}

missing=()
ndk=${ANDROID_NDK_HOME:-${ANDROID_NDK_ROOT:-}}
if [[ -z $ndk ]]; then
	missing+=("ANDROID_NDK_HOME is not set (install the Android NDK 29 and export ANDROID_NDK_HOME)")
elif [[ ! -d $ndk ]]; then
	missing+=("ANDROID_NDK_HOME=$ndk is not a directory")
fi
if [[ -z ${ANDROID_HOME:-${ANDROID_SDK_ROOT:-}} ]]; then
	missing+=("ANDROID_HOME / ANDROID_SDK_ROOT is not set (the Android SDK with platform 34)")
fi
cargo ndk --version >/dev/null 2>&1 || missing+=("cargo-ndk (cargo install cargo-ndk)")
if command -v rustup >/dev/null 2>&1; then
	installed=$(rustup target list --installed)
	for t in "${RUST_TARGETS[@]}"; do
		grep -qx "$t" <<<"$installed" || missing+=("Rust target $t (rustup target add $t)")
	done
else
	missing+=("rustup (to add the Android Rust targets)")
fi
if [[ -x $MODULE/gradlew ]]; then
	GRADLE=("$MODULE/gradlew")
elif command -v gradle >/dev/null 2>&1; then
	GRADLE=(gradle)
else
	missing+=("gradle (no gradle on PATH and no bindings/kotlin/gradlew)")
fi
if ((${#missing[@]})); then
	echo "build-android: cannot build here; missing:" >&2
	printf '  - %s\n' "${missing[@]}" >&2
	exit 1
fi

cd "$ROOT"
"$ROOT/scripts/generate-bindings.sh" --check

targets=()
for abi in "${ABIS[@]}"; do targets+=(-t "$abi"); done
# Only the cdylib (`cargo rustc`): built alongside the rlib and staticlib it comes out ~25% larger.
# No default features: the `cli` feature (the CLI, the bindings generator and their crates) is not
# for phones; scripts/report-size.sh checks that none of its crates is linked in.
cargo ndk "${targets[@]}" --platform 21 -o "$MODULE/src/main/jniLibs" \
	rustc --profile "$PROFILE" --no-default-features --lib --crate-type cdylib

"${GRADLE[@]}" -p "$MODULE" assembleRelease
ls -l "$MODULE"/build/outputs/aar/*.aar
