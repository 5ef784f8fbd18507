#!/usr/bin/env bash
# Builds the host cdylib (libto_device_crypto.so) and staticlib (libto_device_crypto.a) with the
# size-optimised `release` profile (the one the mobile packages use, see Cargo.toml), strips copies
# the way the app packaging does, prints the sizes and fails if either is over its budget.
#
#   scripts/report-size.sh                 build with PROFILE (default release) and check
#   PROFILE=other scripts/report-size.sh   the same for another Cargo profile (to compare)
#
# The host (x86_64 Linux) build stands in for the Android/iOS ones: the same Rust code and profile,
# so a regression (a new dependency, a lost LTO setting) shows here first. The budgets are the sizes
# measured when they were set plus ~20% headroom; raise them deliberately, in review, not to make
# this script pass.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/to-device-crypto/target}
PROFILE=${PROFILE:-release}

# Budgets, in bytes, for the STRIPPED libraries built with `release` (measured on x86_64 Linux with
# rustc 1.95 when set: cdylib 2.50 MiB, staticlib 8.14 MiB; about 20% headroom on top).
CDYLIB_BUDGET=$((3 * 1024 * 1024))    # 3 MiB
STATICLIB_BUDGET=$((19 * 512 * 1024)) # 9.5 MiB

command -v strip >/dev/null 2>&1 || { echo "report-size: strip (binutils) not found" >&2; exit 1; }

cd "$ROOT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Cargo puts the `dev` profile in debug/ and every other profile in a directory of its name.
dir=$CARGO_TARGET_DIR/$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")

# One crate type per build, as the packaging scripts do: when rustc emits rlib + cdylib + staticlib
# in one go it cannot LTO the staticlib (which then carries every dependency's objects, uniffi_bindgen
# and clap included: ~78 MiB stripped instead of ~8) and the cdylib comes out ~25% bigger.
start=$(date +%s)
for kind in cdylib staticlib; do
	cargo rustc --quiet --locked --profile "$PROFILE" --lib --crate-type "$kind"
	case $kind in
	cdylib) f=$dir/libto_device_crypto.so ;;
	staticlib) f=$dir/libto_device_crypto.a ;;
	esac
	[[ -f $f ]] || { echo "report-size: $f was not built" >&2; exit 1; }
	cp "$f" "$tmp/"
	cp "$f" "$tmp/$(basename "$f").built"
done
secs=$(($(date +%s) - start))

strip --strip-unneeded "$tmp/libto_device_crypto.so"
strip -S "$tmp/libto_device_crypto.a"
gzip -9 -c "$tmp/libto_device_crypto.so" >"$tmp/so.gz"

size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

so_stripped=$(size "$tmp/libto_device_crypto.so")
a_stripped=$(size "$tmp/libto_device_crypto.a")

echo "report-size: profile $PROFILE, $(rustc --version | cut -d' ' -f1-2), $(uname -m), builds ${secs} s"
printf '  %-10s %12s %12s %14s %12s\n' library built stripped "stripped+gzip" budget
printf '  %-10s %12s %12s %14s %12s\n' cdylib "$(mib "$(size "$tmp/libto_device_crypto.so.built")")" "$(mib "$so_stripped")" \
	"$(mib "$(size "$tmp/so.gz")")" "$(mib "$CDYLIB_BUDGET")"
printf '  %-10s %12s %12s %14s %12s\n' staticlib "$(mib "$(size "$tmp/libto_device_crypto.a.built")")" "$(mib "$a_stripped")" \
	- "$(mib "$STATICLIB_BUDGET")"

over=()
((so_stripped <= CDYLIB_BUDGET)) || over+=("cdylib $so_stripped > $CDYLIB_BUDGET bytes")
((a_stripped <= STATICLIB_BUDGET)) || over+=("staticlib $a_stripped > $STATICLIB_BUDGET bytes")
if ((${#over[@]})); then
	echo "report-size: OVER BUDGET:" >&2
	printf '  %s\n' "${over[@]}" >&2
	[[ $PROFILE == release ]] || echo "  (the budgets are for release; this was $PROFILE)" >&2
	exit 1
fi
echo "report-size: within budget"
