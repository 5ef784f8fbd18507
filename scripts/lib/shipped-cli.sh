#!/usr/bin/env bash
# The `to-device-crypto` CLI as users build it — default features, so no `testing` seams — for the
# interop tests (scripts/interop.sh) and the shipped-CLI check (scripts/check-shipped-cli.sh).
#
# Source this file from the repository root, then `tdc_build_shipped_cli` builds it (a no-op when it
# is fresh) and prints the binary's path. Both scripts use the same target directory, so the CLI is
# built once per change. The directory is its own (not the main one): this package's library files
# are written without a hash, and a build with other features in the same directory would
# overwrite the test build's library, which Cargo would then rebuild.

tdc_shipped_cli_target() {
	echo "${TDC_INTEROP_TARGET:-${TDC_CACHE:-$HOME/.cache/to-device-crypto}/interop-target}/cli"
}

tdc_build_shipped_cli() {
	local target
	target=$(tdc_shipped_cli_target)
	CARGO_TARGET_DIR="$target" nice -n 10 cargo build --locked --quiet --manifest-path Cargo.toml \
		--bin to-device-crypto >&2 || return 1
	echo "$target/debug/to-device-crypto"
}
