#!/usr/bin/env bash
# Proves that the CLI users build (default features) carries none of the `testing` feature's seams:
#   1. nm: no symbol of the fail-point module or the simulator, and the binary does not even hold
#      the names of their environment variables;
#   2. running it: with TDC_FAIL_POINT, TDC_PAUSE_AT and TDC_PHASE_MARKERS set for every phase (and
#      the fail-point names of earlier versions), `decrypt` still decrypts, exits 0 and writes no
#      marker — where a `testing` build aborts, hangs or marks.
#
#   scripts/check-shipped-cli.sh           build the shipped CLI (scripts/lib/shipped-cli.sh), check it
#   scripts/check-shipped-cli.sh BINARY    check BINARY instead (a `testing` build must fail this)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -gt 0 ]]; then
	cli=$1
else
	# shellcheck source=scripts/lib/shipped-cli.sh
	source scripts/lib/shipped-cli.sh
	cli=$(tdc_build_shipped_cli)
fi
[[ -x $cli ]] || { echo "check-shipped-cli: $cli is not an executable" >&2; exit 1; }
command -v nm >/dev/null 2>&1 || { echo "check-shipped-cli: nm (binutils) not found" >&2; exit 1; }

failures=()
seams=$(nm -C "$cli" 2>/dev/null | grep -cE 'to_device_crypto::(fail_point|simulator)::' || true)
((seams == 0)) || failures+=("$seams symbols of to_device_crypto::fail_point or ::simulator")
for name in TDC_FAIL_POINT TDC_PAUSE_AT TDC_PHASE_MARKERS; do
	grep -qa "$name" "$cli" && failures+=("the binary holds the string $name")
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() { "$cli" "$@" 2>>"$work/stderr.log"; }
run keys --store "$work/bob" --user-id @bob:example.org --device-id BOBPHONE >"$work/bob-keys.json"
run keys --store "$work/alice" --user-id @alice:example.org --device-id ALICEPHONE >/dev/null
points=(opened decrypted committed printed acknowledged before_commit after_commit after_print)
for point in "${points[@]}"; do
	# A new message per run: each run must decrypt its own.
	run encrypt --store "$work/alice" --recipient-keys "$work/bob-keys.json" --type m.room_key \
		--content "{\"point\": \"$point\"}" >"$work/event.json"
	status=0
	TDC_FAIL_POINT=$point TDC_PAUSE_AT=$point TDC_PHASE_MARKERS=1 timeout 60 \
		"$cli" decrypt --store "$work/bob" "$work/event.json" >"$work/out.json" 2>"$work/err.log" || status=$?
	if ((status != 0)); then
		failures+=("decrypt with TDC_FAIL_POINT=$point ended with status $status: $(tr '\n' ' ' <"$work/err.log")")
	elif ! grep -q '"result":"decrypted"' "$work/out.json"; then
		failures+=("decrypt with TDC_FAIL_POINT=$point did not decrypt: $(cat "$work/out.json")")
	elif grep -qE '^tdc-(phase|lock):|fail point|paused at' "$work/err.log"; then
		failures+=("decrypt with TDC_PHASE_MARKERS=1 wrote markers: $(tr '\n' ' ' <"$work/err.log")")
	fi
done

if ((${#failures[@]})); then
	echo "check-shipped-cli: $cli HAS TEST SEAMS:" >&2
	printf '  %s\n' "${failures[@]}" >&2
	exit 1
fi
echo "check-shipped-cli: $cli ignores TDC_FAIL_POINT, TDC_PAUSE_AT and TDC_PHASE_MARKERS at all ${#points[@]} points and holds no test seam (nm, strings)"
