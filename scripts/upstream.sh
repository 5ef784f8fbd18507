#!/usr/bin/env bash
# The upstream change set (docs/UPSTREAM.md): the patch series in upstream/matrix-sdk-crypto/
# against the published matrix-sdk-{common,crypto,base}, the SDK's own tests, the sdk-olm CLI over
# the patched SDK and the side-by-side comparison with our crate.
#
#   scripts/upstream.sh              fetch and patch the published sources, run the SDK's tests for the
#                                    patched crates, build sdk-olm, run its tests and the comparison
#   scripts/upstream.sh --print-bin  print the path of the sdk-olm binary (building it when needed);
#                                    progress goes to stderr, the path alone to stdout
#   scripts/upstream.sh --prepare    only fetch and patch; print the patched tree's path
#   scripts/upstream.sh --bless      like the default, and rewrite the comparison's generated files
#
# Only the crate registry is reachable, so the sources come through cargo (a throwaway package that
# depends on the exact published versions) and are copied into a git tree under
# ~/.cache/to-device-crypto/upstream/, where the patches are applied with `git am`. The tree is
# rebuilt only when the version, a patch or this script changes, so warm runs keep cargo's
# fingerprints.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
repo=$PWD

# The one place that names the upstream release the patches are made against.
UPSTREAM_VERSION=0.19.1
# The crates the series patches (matrix-sdk-base only builds a struct the series extends).
PATCHED_CRATES=(matrix-sdk-common matrix-sdk-crypto matrix-sdk-base)

export TDC_CACHE="${TDC_CACHE:-$HOME/.cache/to-device-crypto}"
export CARGO_TARGET_DIR="${TDC_UPSTREAM_TARGET:-$TDC_CACHE/upstream-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The patched crates are path dependencies, which cargo compiles incrementally by default: gigabytes of
# caches for sources that change only with the series.
export CARGO_INCREMENTAL=0
# insta must not write snapshots for the tests whose snapshot files are not published.
export INSTA_UPDATE=no
cache="$TDC_CACHE/upstream"
tree="$cache/matrix-rust-sdk-$UPSTREAM_VERSION"
series="$repo/upstream/matrix-sdk-crypto"
harness="$series/test-harness"

mode=all
for arg in "$@"; do
    case "$arg" in
        --print-bin) mode=print-bin ;;
        --prepare) mode=prepare ;;
        --bless) mode=bless ;;
        *) echo "usage: scripts/upstream.sh [--print-bin | --prepare | --bless]" >&2; exit 2 ;;
    esac
done

# Everything else comes through cargo; these are the base system's.
for tool in cargo git python3 sha256sum awk; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: scripts/upstream.sh needs $tool, which is not on PATH" >&2
        exit 1
    fi
done

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
summary=()
note() { echo "upstream: $*" >&2; }
timed() {
    local name=$1 t
    shift
    t=$(now)
    "$@"
    summary+=("$name: $(since "$t") s")
    note "$name: $(since "$t") s"
}
# "warm" when the first argument is a directory; "cold" when it is not, or when a glob matched
# nothing (no argument at all under nullglob: a fresh cache).
state() { if [ $# -gt 0 ] && [ -d "$1" ]; then echo warm; else echo cold; fi; }

# The published crates declare rust-version 1.96; they build and pass their tests with 1.95, the
# newest stable here, so an older but working toolchain is allowed explicitly.
rust_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
cargo_flags=()
if [ "$rust_minor" -lt 96 ]; then cargo_flags+=(--ignore-rust-version); fi
# The series depends on `to-device-analytics` as a crates.io dependency, as it would upstream;
# here it is this repository's analytics/ crate, through a copy at a fixed place in the cache.
# Cargo rebuilds a path dependency when its path changes, and with it everything above it (the
# patched SDK, sdk-olm: minutes); every CI run is a fresh clone at some other path. The copy is
# updated file by file, only where the content differs, so unchanged files keep their times.
analytics_copy="$cache/to-device-analytics"
sync_analytics() {
    python3 - "$repo/analytics" "$analytics_copy" <<'PY'
import os, shutil, sys
source, copy = sys.argv[1:]
wanted = set()
for root, dirs, files in os.walk(source):
    dirs[:] = [d for d in dirs if d != "target"]
    for name in files:
        rel = os.path.relpath(os.path.join(root, name), source)
        wanted.add(rel)
        target = os.path.join(copy, rel)
        with open(os.path.join(source, rel), "rb") as f:
            data = f.read()
        if os.path.exists(target):
            with open(target, "rb") as f:
                if f.read() == data:
                    continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
for root, dirs, files in os.walk(copy, topdown=False):
    for name in files:
        path = os.path.join(root, name)
        if os.path.relpath(path, copy) not in wanted:
            os.remove(path)
    if root != copy and not os.listdir(root):
        os.rmdir(root)
PY
}
patch_analytics=(--config "patch.crates-io.to-device-analytics.path=\"$analytics_copy\"")

git_tree() { git -C "$tree" -c user.name=upstream.sh -c user.email=upstream@localhost "$@"; }

# 1. The published sources, through cargo: prints "name directory" per crate.
fetch_sources() {
    local fetch="$cache/fetch-$UPSTREAM_VERSION"
    mkdir -p "$fetch/src"
    {
        printf '[package]\nname = "fetch-matrix-sdk"\nversion = "0.0.0"\nedition = "2021"\n'
        printf 'publish = false\n\n[workspace]\n\n[dependencies]\n'
        for c in "${PATCHED_CRATES[@]}"; do printf '%s = "=%s"\n' "$c" "$UPSTREAM_VERSION"; done
    } >"$fetch/Cargo.toml"
    echo "fn main() {}" >"$fetch/src/main.rs"
    cargo fetch --quiet --manifest-path "$fetch/Cargo.toml" >&2
    cargo metadata --quiet --format-version 1 --manifest-path "$fetch/Cargo.toml" |
        python3 -c '
import json, os, sys
wanted, version = sys.argv[1:-1], sys.argv[-1]
found = {p["name"]: os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"]
         if p["name"] in wanted and p["version"] == version}
missing = [w for w in wanted if w not in found]
if missing:
    sys.exit("error: cargo did not fetch " + ", ".join(missing) + " " + version)
for w in wanted:
    print(w, found[w])
' "${PATCHED_CRATES[@]}" "$UPSTREAM_VERSION"
}

# 2. A git tree with the published sources as its first commit, the series applied on top, then the
# test-harness patches (changes to the SDK's tests that only make them build and run from the
# published crates; not part of the upstream change).
prepare_tree() {
    local main=("$series"/*.patch) test_only=("$harness"/*.patch) stamp sources patch name dir
    if [ ${#main[@]} -eq 0 ]; then
        echo "error: no patches in ${series#"$repo"/}" >&2
        exit 1
    fi
    stamp=$(cat "$0" "${main[@]}" "${test_only[@]}" "$harness/Cargo.lock" upstream/sdk-olm/Cargo.toml |
        sha256sum | cut -c1-16)
    if [ -f "$tree/.prepared" ] && [ "$(cat "$tree/.prepared")" = "$stamp" ] &&
        [ -z "$(git -C "$tree" status --porcelain --untracked-files=no)" ]; then
        note "patched tree is up to date: $tree"
        return
    fi
    sources=$(fetch_sources)
    rm -rf "$tree"
    mkdir -p "$tree/crates"
    while read -r name dir; do
        cp -R "$dir" "$tree/crates/$name"
        # Cargo's extraction marker and VCS info are not part of the sources.
        rm -f "$tree/crates/$name/.cargo-ok" "$tree/crates/$name/.cargo_vcs_info.json"
    done <<<"$sources"
    # A workspace so that the crates build against each other instead of their published copies;
    # the SDK's own tests run from here. The lock file pins what the tests were run with.
    {
        printf '[workspace]\nresolver = "2"\nmembers = ['
        printf '"crates/%s", ' "${PATCHED_CRATES[@]}"
        printf ']\n\n[patch.crates-io]\n'
        for c in "${PATCHED_CRATES[@]}"; do printf '%s = { path = "crates/%s" }\n' "$c" "$c"; done
        # The same profile as sdk-olm's (see its Cargo.toml), so that the two builds share the
        # dependencies they have in common in one target dir.
        sed -n '/^\[profile/,$p' "$repo/upstream/sdk-olm/Cargo.toml" | grep -v '^#'
    } >"$tree/Cargo.toml"
    cp "$harness/Cargo.lock" "$tree/Cargo.lock"
    # The SDK repository's rustfmt settings (nightly rustfmt), for whoever refreshes the series.
    printf '%s\n' 'max_width = 100' 'comment_width = 80' 'wrap_comments = true' \
        'imports_granularity = "Crate"' 'use_small_heuristics = "Max"' \
        'group_imports = "StdExternalCrate"' >"$tree/.rustfmt.toml"
    printf '%s\n' /.prepared /target '*.snap.new' >"$tree/.gitignore"
    git -C "$tree" init --quiet --initial-branch=published
    git_tree add -A
    git_tree commit --quiet -m "${PATCHED_CRATES[*]} $UPSTREAM_VERSION as published on crates.io"
    git_tree checkout --quiet -b patched
    for patch in "${main[@]}" "${test_only[@]}"; do
        if ! git_tree am --quiet --committer-date-is-author-date "$patch" >&2; then
            git_tree am --abort || true
            echo "error: ${patch#"$repo"/} does not apply to the published $UPSTREAM_VERSION sources" >&2
            echo "       (tree: $tree; refresh the series for this release)" >&2
            exit 1
        fi
    done
    echo "$stamp" >"$tree/.prepared"
    note "applied ${#main[@]} patches (+ ${#test_only[@]} test-harness patches) to $UPSTREAM_VERSION in $tree"
}

# 3. The SDK's own unit tests of the patched crates, leaving out (by exact name) the tests that need
# files only the upstream repository has (test-harness/skipped-tests.txt says which and why).
sdk_tests_build() {
    # The SDK's own test code warns a lot on this toolchain (deprecated assert macros): the log is
    # shown on failure only.
    local log="$cache/sdk-tests-build.log"
    if ! (cd "$tree" && nice -n 10 cargo test "${cargo_flags[@]}" "${patch_analytics[@]}" --no-run \
        -p matrix-sdk-common -p matrix-sdk-crypto --lib) >"$log" 2>&1; then
        cat "$log" >&2
        return 1
    fi
}
sdk_tests_run() {
    local skips=() name log="$cache/sdk-tests-run.log"
    while read -r name _; do
        skips+=(--skip "$name")
    done < <(grep -v '^\s*\(#\|$\)' "$harness/skipped-tests.txt")
    # cargo replays the build's warnings on stderr: shown on failure only, like the build's.
    if ! (cd "$tree" && cargo test "${cargo_flags[@]}" "${patch_analytics[@]}" --quiet \
        -p matrix-sdk-common -p matrix-sdk-crypto --lib -- --exact "${skips[@]}") 2>"$log"; then
        cat "$log" >&2
        return 1
    fi
}

# matrix-sdk-base: the series only adds `failure_reason: None` to two struct literals, one compiled
# only without the `e2e-encryption` feature (sdk-olm's build compiles that: matrix-sdk-sqlite uses
# matrix-sdk-base without it) and one only with it, checked here.
sdk_base_check() {
    (
        cd "$tree"
        nice -n 10 cargo check "${cargo_flags[@]}" "${patch_analytics[@]}" --quiet -p matrix-sdk-base \
            --features e2e-encryption
    )
}

# 4. sdk-olm: its own package (and lock file) outside our workspace, built against the patched tree.
sdk_olm_config=()
for c in "${PATCHED_CRATES[@]}"; do
    sdk_olm_config+=(--config "patch.crates-io.$c.path=\"$tree/crates/$c\"")
done
sdk_olm_config+=("${patch_analytics[@]}")
# Built with its tests, always: `cargo build` alone would resolve dependency features without the
# dev-dependencies and compile part of the SDK a second time.
build_sdk_olm() {
    nice -n 10 cargo test "${cargo_flags[@]}" "${sdk_olm_config[@]}" --quiet --no-run \
        --manifest-path upstream/sdk-olm/Cargo.toml >&2
}
sdk_olm_bin="$CARGO_TARGET_DIR/debug/sdk-olm"

if [ "$mode" = print-bin ]; then
    prepare_tree
    sync_analytics
    build_sdk_olm
    echo "$sdk_olm_bin"
    exit 0
fi

timed "prepare the patched $UPSTREAM_VERSION tree" prepare_tree
sync_analytics
if [ "$mode" = prepare ]; then
    echo "$tree"
    exit 0
fi

tstate=$(state "$CARGO_TARGET_DIR/debug/deps")
timed "SDK unit tests of matrix-sdk-common and -crypto: build ($tstate)" sdk_tests_build
timed "SDK unit tests of matrix-sdk-common and -crypto: run" sdk_tests_run
timed "matrix-sdk-base check with e2e-encryption" sdk_base_check

# Our CLI as users build it, for the comparison: the same binary and target dir as
# scripts/interop.sh, which CI runs first (scripts/lib/shipped-cli.sh).
# shellcheck source=scripts/lib/shipped-cli.sh
source scripts/lib/shipped-cli.sh
cstate=$(state "$(tdc_shipped_cli_target)/debug/deps")
build_our_cli() { TO_DEVICE_CRYPTO_BIN=$(tdc_build_shipped_cli); }
timed "our CLI ($cstate)" build_our_cli
export TO_DEVICE_CRYPTO_BIN

sstate=$(state "$CARGO_TARGET_DIR/debug/.fingerprint/sdk-olm-"*)
timed "sdk-olm, its tests and the comparison: build ($sstate)" build_sdk_olm
if [ "$mode" = bless ]; then export TDC_BLESS=1; fi
run_sdk_olm_tests() {
    cargo test "${cargo_flags[@]}" "${sdk_olm_config[@]}" --manifest-path upstream/sdk-olm/Cargo.toml \
        -- --show-output
}
timed "sdk-olm, its tests and the comparison: run" run_sdk_olm_tests
lint_sdk_olm() {
    cargo fmt --manifest-path upstream/sdk-olm/Cargo.toml --check
    nice -n 10 cargo clippy "${cargo_flags[@]}" "${sdk_olm_config[@]}" --quiet --all-targets \
        --manifest-path upstream/sdk-olm/Cargo.toml -- -D warnings
}
timed "sdk-olm: fmt --check, clippy -D warnings" lint_sdk_olm

echo "upstream timings (target dir $CARGO_TARGET_DIR):"
printf '  %s\n' "${summary[@]}"
