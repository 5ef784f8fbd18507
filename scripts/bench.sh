#!/usr/bin/env bash
# Prints the benchmark tables: every row is a ratio of medians measured in the same run (absolute
# times on a shared machine are noise).
#   1-4b, 6  cargo bench --bench ratios      (floor, SQLite, session creation, failure path, scale)
#   6 (mem)  peak RSS of the CLI decrypting 10,000 events
#   5        the reference SDK: scripts/interop.sh --bench (matrix-sdk-crypto, built separately)
#   7        FFI per-event overhead: printed by scripts/test-bindings.sh for Python, Kotlin, Swift
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TDC_CACHE:-$HOME/.cache/to-device-crypto}/target}"

cargo bench --locked --bench ratios

cargo build --locked --release --bin to-device-crypto
bin="$CARGO_TARGET_DIR/release/to-device-crypto"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" keys --store "$work/bob" --user-id @bob:example.org --device-id BOBPHONE >"$work/bob.json" 2>/dev/null
content='{"algorithm":"m.megolm.v1.aes-sha2","room_id":"!r:example.org","session_key":"'$(printf 'A%.0s' $(seq 1 360))'"}'
"$bin" encrypt --store "$work/alice" --user-id @alice:example.org --device-id ALICE \
    --recipient-keys "$work/bob.json" --type m.room_key --content "$content" --count 10000 \
    >"$work/events.json" 2>/dev/null
python3 - "$bin" "$work" <<'PY'
import resource, subprocess, sys, time
binary, work = sys.argv[1], sys.argv[2]
start = time.monotonic()
out = subprocess.run([binary, "decrypt", "--store", f"{work}/bob", f"{work}/events.json"],
                     capture_output=True, check=True).stdout
seconds = time.monotonic() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
decrypted = out.count(b'"result":"decrypted"')
size_mib = len(open(f"{work}/events.json", "rb").read()) / 2**20
print(f"6 CLI decrypting 10,000 events ({size_mib:.1f} MiB input): {decrypted} decrypted, "
      f"peak RSS {peak_kib / 1024:.1f} MiB, {seconds * 1e6 / 10000:.1f} µs/event including start-up")
PY
