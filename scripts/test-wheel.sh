#!/usr/bin/env bash
# The Python wheel as a user gets it:
#   1. scripts/build-wheel.sh (the release library; reused when scripts/report-size.sh built it);
#   2. a fresh virtual environment; `pip install --no-index <wheel>` (nothing else is available, so
#      nothing else can be needed); `import to_device_crypto` from outside the repository, checking
#      that it is the installed copy and that it works (open a machine, its first keys upload);
#   3. posthog (pinned, from a wheelhouse cached in $TDC_CACHE, downloaded from PyPI on first use)
#      and the README's Python example — the block after `<!-- snippet: python-example -->`, exactly
#      as written — run by bindings/python/test_readme_example.py against stand-ins for the
#      homeserver and PostHog.
# Exits non-zero if any step fails; prints the wheel's size and each step's time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TDC_CACHE=${TDC_CACHE:-$HOME/.cache/to-device-crypto}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TDC_CACHE/target}
# The posthog-python release the README example is tested with (capture(event, distinct_id=…,
# properties=…) since 6.0).
POSTHOG_VERSION=${TDC_POSTHOG_VERSION:-7.91.1}
# shellcheck source=scripts/lib/toolchains.sh
source "$ROOT/scripts/lib/toolchains.sh"
tdc_ensure_python

cd "$ROOT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
lap() { echo "test-wheel: $1 ($((SECONDS - t0)) s)"; t0=$SECONDS; }

wheel=$(TDC_PYTHON=$TDC_PYTHON scripts/build-wheel.sh "$WORK/dist" | tail -1)
[[ -f $wheel ]] || { echo "test-wheel: build-wheel.sh printed no wheel" >&2; exit 1; }
lap "built $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB"

"$TDC_PYTHON" -m venv "$WORK/venv"
py=$WORK/venv/bin/python
"$py" -m pip install --quiet --disable-pip-version-check --no-index "$wheel"
lap "installed into a fresh virtual environment with --no-index"

# From an empty directory, so that nothing but the installed package can be imported.
mkdir "$WORK/elsewhere"
(cd "$WORK/elsewhere" && "$py" - "$WORK/venv") <<'EOF'
import asyncio, json, os, sys
import to_device_crypto
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(to_device_crypto.__file__)
assert where.startswith(venv + os.sep), "imported %s, not the installed copy" % where
async def main():
    machine = await to_device_crypto.OlmMachine.open_in_memory("@bot:example.org", "BOTDEVICE")
    upload = json.loads(await machine.keys_for_upload())
    assert len(upload["one_time_keys"]) == 25, upload
    reason = to_device_crypto.failure_reason_from_name("MissingSession")
    assert reason.posthog_event().properties["name"] == "ToDeviceFailedToDecrypt_MissingSession"
asyncio.run(main())
print("test-wheel: import to_device_crypto works from the wheel alone (%s)" % os.path.relpath(where, venv))
EOF
lap "imported"

wheelhouse=$TDC_CACHE/wheelhouse/posthog-$POSTHOG_VERSION
if [[ ! -f $wheelhouse/.complete ]]; then
	echo "test-wheel: downloading posthog==$POSTHOG_VERSION and its dependencies from PyPI (once)"
	mkdir -p "$(dirname "$wheelhouse")"
	partial=$(mktemp -d "$wheelhouse.partial.XXXXXX")
	"$py" -m pip download --quiet --disable-pip-version-check --dest "$partial" "posthog==$POSTHOG_VERSION"
	touch "$partial/.complete"
	# Marker first, then an atomic rename; if another run got there first, keep its copy.
	rm -rf "$wheelhouse"
	mv -T "$partial" "$wheelhouse" 2>/dev/null || rm -rf "$partial"
fi
"$py" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheelhouse" "posthog==$POSTHOG_VERSION"
lap "installed posthog $POSTHOG_VERSION"

# Outside bindings/python, so that the harness imports the installed package, not the sources.
python3 scripts/lib/readme_snippet.py python-example >"$WORK/bot.py"
cp bindings/python/test_readme_example.py "$WORK/"
"$py" "$WORK/test_readme_example.py" "$WORK/bot.py"
lap "ran the README example"
