#!/usr/bin/env bash
# Builds the host cdylib (libto_device_crypto.so) and staticlib (libto_device_crypto.a) exactly as
# the mobile packages do — the size-optimised `release` profile (see Cargo.toml) and no default
# features, so without the CLI and the bindings generator — checks that none of the build tools'
# crates is linked in, strips copies the way the app packaging does, prints the sizes and fails
# if either is over its budget.
#
#   scripts/report-size.sh                 build with PROFILE (default release) and check
#   PROFILE=other scripts/report-size.sh   the same for another Cargo profile (to compare)
#   FEATURES="--features cli" scripts/report-size.sh
#                                          the same with other features (to compare; the link
#                                          check then fails when it finds the CLI's crates)
#
# The host (x86_64 Linux) build stands in for the Android/iOS ones: the same Rust code, features
# and profile, so a regression (a new dependency, a lost LTO setting) shows here first. The budgets
# are the sizes measured when they were set plus ~20% headroom; raise them deliberately, in review,
# not to make this script pass.
#
# It builds in its own target directory ($CARGO_TARGET_DIR/mobile-size): this package is also a
# cdylib and a staticlib, whose files Cargo writes without a hash, so any other build of the
# library in the same directory (the CLI, `cargo build --lib`) would overwrite the library this
# script measures without Cargo rebuilding it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/to-device-crypto/target}/mobile-size
PROFILE=${PROFILE:-release}
# The mobile libraries' features: none (the default `cli` feature is the CLI and the bindgen).
read -r -a FEATURE_ARGS <<<"${FEATURES:---no-default-features}"

# Budgets, in bytes, for the STRIPPED libraries built with `release` and no default features
# (measured on x86_64 Linux with rustc 1.95: cdylib 2.61 MiB, staticlib 8.40 MiB; 15% and 13%
# headroom). Taking the CLI's crates out of the libraries' build saved only 8 KB and 35 KB here:
# fat LTO had already dropped their code, which nothing in the library calls. The check below
# keeps it that way, and matters most for builds without LTO (a `dev` staticlib bundles every
# dependency's objects).
CDYLIB_BUDGET=$((3 * 1024 * 1024))    # 3 MiB
STATICLIB_BUDGET=$((19 * 512 * 1024)) # 9.5 MiB

# Crates only the CLI and the bindings generator need: none may be linked into a mobile library.
BUILD_TOOL_CRATES=(uniffi_bindgen goblin clap clap_builder clap_lex toml toml_edit toml_parser
	toml_datetime toml_writer cargo_metadata weedle weedle2 askama)

for tool in strip ar nm; do
	command -v "$tool" >/dev/null 2>&1 || { echo "report-size: $tool (binutils) not found" >&2; exit 1; }
done

cd "$ROOT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# First the dependency graph: no build tool among the crates the library links (proc macros run on
# the build host and link nothing into it: `toml` stays there, under uniffi_macros).
crates_pattern=$(IFS='|'; echo "${BUILD_TOOL_CRATES[*]}")
in_graph=$(cargo tree --locked -p to-device-crypto "${FEATURE_ARGS[@]}" -e normal,no-proc-macro --prefix none |
	sed 's/ .*//' | sort -u | grep -xE "$crates_pattern" || true)
if [[ -n $in_graph ]]; then
	echo "report-size: the library's linked dependencies (features '${FEATURE_ARGS[*]}') include build tools:" $in_graph >&2
	exit 1
fi

# Cargo puts the `dev` profile in debug/ and every other profile in a directory of its name.
dir=$CARGO_TARGET_DIR/$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")

# One crate type per build, as the packaging scripts do: when rustc emits rlib + cdylib + staticlib
# in one go it cannot LTO the staticlib (which then carries every dependency's objects: ~78 MiB
# stripped instead of ~8) and the cdylib comes out ~25% bigger.
start=$(date +%s)
for kind in cdylib staticlib; do
	cargo rustc --quiet --locked --profile "$PROFILE" "${FEATURE_ARGS[@]}" --lib --crate-type "$kind"
	case $kind in
	cdylib) f=$dir/libto_device_crypto.so ;;
	staticlib) f=$dir/libto_device_crypto.a ;;
	esac
	[[ -f $f ]] || { echo "report-size: $f was not built" >&2; exit 1; }
	cp "$f" "$tmp/"
	cp "$f" "$tmp/$(basename "$f").built"
done
secs=$(($(date +%s) - start))

# The link check, on the unstripped libraries: the staticlib's members (`ar t`: one object per
# crate without LTO, named after it) and both libraries' demangled symbols (`nm -C`: with LTO the
# objects merge, but every function keeps its crate path, e.g. `clap_builder::builder::...`).
linked=()
while read -r crate; do
	[[ -n $crate ]] && linked+=("$crate (staticlib member)")
done < <(ar t "$tmp/libto_device_crypto.a.built" | grep -oE "^($crates_pattern)-[0-9a-f]+\." | sed 's/-.*//' | sort -u)
for lib in libto_device_crypto.a libto_device_crypto.so; do
	while read -r crate; do
		[[ -n $crate ]] && linked+=("$crate (symbols in ${lib##*.})")
	done < <(nm -C "$tmp/$lib.built" 2>/dev/null | grep -oE "(^|[^A-Za-z0-9_])($crates_pattern)::" |
		grep -oE "($crates_pattern)" | sort -u)
done
members=$(ar t "$tmp/libto_device_crypto.a.built" | wc -l)

strip --strip-unneeded "$tmp/libto_device_crypto.so"
strip -S "$tmp/libto_device_crypto.a"
gzip -9 -c "$tmp/libto_device_crypto.so" >"$tmp/so.gz"

size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

so_stripped=$(size "$tmp/libto_device_crypto.so")
a_stripped=$(size "$tmp/libto_device_crypto.a")

echo "report-size: profile $PROFILE, features '${FEATURE_ARGS[*]}', $(rustc --version | cut -d' ' -f1-2), $(uname -m), builds ${secs} s"
printf '  %-10s %12s %12s %14s %12s\n' library built stripped "stripped+gzip" budget
printf '  %-10s %12s %12s %14s %12s\n' cdylib "$(mib "$(size "$tmp/libto_device_crypto.so.built")")" "$(mib "$so_stripped")" \
	"$(mib "$(size "$tmp/so.gz")")" "$(mib "$CDYLIB_BUDGET")"
printf '  %-10s %12s %12s %14s %12s\n' staticlib "$(mib "$(size "$tmp/libto_device_crypto.a.built")")" "$(mib "$a_stripped")" \
	- "$(mib "$STATICLIB_BUDGET")"

if ((${#linked[@]})); then
	echo "report-size: BUILD TOOLS LINKED INTO THE MOBILE LIBRARY (features '${FEATURE_ARGS[*]}'):" >&2
	printf '  %s\n' "${linked[@]}" | sort -u >&2
	echo "  (a dependency or feature pulls the CLI's or the bindings generator's crates into the library)" >&2
	exit 1
fi
echo "report-size: none of ${BUILD_TOOL_CRATES[*]} is linked in (cargo tree; ar t: $members members; nm -C: both libraries)"

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
