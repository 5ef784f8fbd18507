#!/usr/bin/env bash
# shellcheck disable=SC2015 # `a && b || fail` is intended: fail if either step fails
#
# Foreign-language toolchains for testing the UniFFI bindings (Kotlin/JVM, Swift, Python).
#
# Source this file, then call the tdc_ensure_* functions you need:
#
#   tdc_ensure_kotlin   exports TDC_KOTLINC TDC_KOTLIN_STDLIB TDC_COROUTINES_JAR TDC_JNA_JAR
#   tdc_ensure_swift    exports TDC_SWIFT_ROOT (a Debian trixie chroot with swiftlang)
#   tdc_ensure_python   exports TDC_PYTHON
#   tdc_in_swift_chroot HOST_DIR CMD...   run CMD inside the Swift chroot, cwd = HOST_DIR
#
# It can also be run directly to pre-warm the cache: bash toolchains.sh kotlin swift python
#
# Everything is cached outside the repository, under ${TDC_CACHE:-$HOME/.cache/to-device-crypto},
# so that `git clean` never throws away ~3 GB and minutes of downloads. Each function installs only
# what is missing and returns in well under a second when the cache is warm.
#
# Only Debian mirrors, the npm registry, PyPI and crates.io are reachable from our machines, which is
# why Kotlin comes from npm (the kotlin-compiler package is the full kotlinc distribution) and Swift
# from a trixie chroot (swiftlang is packaged in trixie, but needs glibc 2.38; the host is bookworm).
#
# The functions never change the caller's shell options and do not rely on `set -e` (it is silently
# disabled inside a function called as `f || ...`), so every step is checked explicitly. They are safe
# under `set -euo pipefail`. On error they print "tdc: ERROR: ..." and return non-zero.

TDC_KOTLIN_VERSION=${TDC_KOTLIN_VERSION:-2.4.20}
TDC_SWIFT_SUITE=${TDC_SWIFT_SUITE:-trixie}
TDC_SWIFT_PACKAGES=${TDC_SWIFT_PACKAGES:-swiftlang libc6-dev}

tdc__say() { printf 'tdc: %s\n' "$*" >&2; }
tdc__err() { printf 'tdc: ERROR: %s\n' "$*" >&2; }

tdc__cache() { printf '%s\n' "${TDC_CACHE:-$HOME/.cache/to-device-crypto}"; }

# Installs Debian packages on the host. The package lists are refreshed only if the first attempt
# fails, because `apt-get update` costs ~10 s and is usually unnecessary. The lock timeout lets us
# wait for a teammate's concurrent apt run instead of failing on "Could not get lock".
tdc__apt_install() {
	local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
	"${apt[@]}" install --no-install-recommends "$@" >/dev/null 2>&1 && return 0
	tdc__say "apt-get install $* failed; refreshing package lists and retrying"
	"${apt[@]}" update >/dev/null 2>&1 || { tdc__err "apt-get update failed"; return 1; }
	"${apt[@]}" install --no-install-recommends "$@" >&2 || {
		tdc__err "apt-get install $* failed"
		return 1
	}
}

tdc__dpkg_installed() {
	local status
	status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
	[[ $status == "install ok installed" ]]
}

# Runs "$@" while holding an exclusive lock on file $1, so that two scripts ensuring the same
# toolchain at once do not both download it or delete each other's half-built directory.
# The subshell keeps the lock fd out of the caller and releases the lock on any exit.
tdc__with_lock() (
	exec 9>"$1" || { tdc__err "cannot open lock file $1"; exit 1; }
	shift
	if ! flock -n 9; then
		tdc__say "waiting for another process installing the same toolchain"
		flock 9 || exit 1
	fi
	"$@"
)

# ---------------------------------------------------------------------------------------------------
# Kotlin / JVM

tdc__kotlin_home() { printf '%s/kotlin-compiler-%s/package\n' "$(tdc__cache)" "$TDC_KOTLIN_VERSION"; }

tdc__install_kotlin() {
	local home dest partial tgz
	home=$(tdc__kotlin_home)
	dest=${home%/package}
	[[ -f $dest/.tdc-complete ]] && return 0 # another process finished while we waited for the lock

	if ! command -v npm >/dev/null 2>&1; then
		tdc__say "kotlin: npm not found, installing it with apt"
		tdc__apt_install npm || return 1
	fi
	tdc__say "kotlin: fetching kotlin-compiler@$TDC_KOTLIN_VERSION from npm (~90 MB)"
	partial=$dest.partial
	rm -rf -- "$partial" && mkdir -p -- "$partial" || { tdc__err "cannot create $partial"; return 1; }
	# --ignore-scripts: we only want the tarball; nothing of the package should run at fetch time.
	# A throw-away npm cache, or ~/.npm would keep a second 90 MB copy of the tarball.
	(cd -- "$partial" && npm pack --loglevel=error --ignore-scripts --cache "$partial/npm-cache" \
		"kotlin-compiler@$TDC_KOTLIN_VERSION" >/dev/null) || {
		tdc__err "npm pack kotlin-compiler@$TDC_KOTLIN_VERSION failed"
		return 1
	}
	tgz=$partial/kotlin-compiler-$TDC_KOTLIN_VERSION.tgz
	tar -xzf "$tgz" -C "$partial" && rm -rf -- "$tgz" "$partial/npm-cache" || { tdc__err "cannot unpack $tgz"; return 1; }
	local f
	for f in bin/kotlinc lib/kotlin-stdlib.jar lib/kotlinx-coroutines-core-jvm.jar; do
		[[ -e $partial/package/$f ]] || { tdc__err "kotlin-compiler package lacks $f"; return 1; }
	done
	chmod +x "$partial"/package/bin/* || return 1
	# Marker first, then an atomic rename: a half-unpacked directory is never taken for a good one.
	touch "$partial/.tdc-complete" || return 1
	rm -rf -- "$dest" && mv -T -- "$partial" "$dest" || { tdc__err "cannot move $partial to $dest"; return 1; }
}

tdc_ensure_kotlin() {
	local cache home
	cache=$(tdc__cache)
	home=$(tdc__kotlin_home)
	mkdir -p -- "$cache" || { tdc__err "cannot create $cache"; return 1; }

	if [[ ! -f ${home%/package}/.tdc-complete ]]; then
		tdc__with_lock "$cache/kotlin.lock" tdc__install_kotlin || return 1
	fi

	if ! command -v java >/dev/null 2>&1; then
		tdc__say "kotlin: java not found, installing openjdk-17-jdk-headless"
		tdc__apt_install openjdk-17-jdk-headless || return 1
	fi

	# Debian's JNA, not a jar from Maven Central (unreachable). Its jar is patched to load the
	# system libjnidispatch, so it works without bundling native code. UniFFI needs JNA >= 5.12;
	# bookworm ships 5.13.
	if ! tdc__dpkg_installed libjna-java; then
		tdc__say "kotlin: installing libjna-java"
		tdc__apt_install libjna-java || return 1
	fi
	local files f jna=""
	files=$(dpkg -L libjna-java) || { tdc__err "dpkg -L libjna-java failed"; return 1; }
	while IFS= read -r f; do
		[[ $f == */jna.jar && -f $f ]] && { jna=$f; break; }
	done <<<"$files"
	[[ -n $jna ]] || { tdc__err "libjna-java is installed but provides no jna.jar"; return 1; }

	export TDC_KOTLINC=$home/bin/kotlinc
	export TDC_KOTLIN_STDLIB=$home/lib/kotlin-stdlib.jar
	export TDC_COROUTINES_JAR=$home/lib/kotlinx-coroutines-core-jvm.jar
	export TDC_JNA_JAR=$jna
	tdc__say "kotlin: ready (kotlinc $TDC_KOTLIN_VERSION, $TDC_JNA_JAR)"
}

# ---------------------------------------------------------------------------------------------------
# Swift (inside a Debian trixie chroot)

tdc__swift_root() { printf '%s/swift-chroot\n' "$(tdc__cache)"; }

# Debian mirror configured for this machine (the one serving the host's own suite, not the security
# archive), from one-line *.list files or deb822 *.sources files. TDC_DEBIAN_MIRROR overrides.
tdc__debian_mirror() {
	if [[ -n ${TDC_DEBIAN_MIRROR:-} ]]; then
		printf '%s\n' "$TDC_DEBIAN_MIRROR"
		return 0
	fi
	local codename=""
	# shellcheck disable=SC1091
	codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}") || true
	local -a files=()
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[[ -r $f ]] && files+=("$f")
	done
	((${#files[@]})) || { tdc__err "no apt sources found in /etc/apt"; return 1; }
	local mirror
	mirror=$(awk -v want="${codename:-bookworm}" '
		function flush() {
			if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " want " ") && uris != "" && !found) {
				split(uris, u, " "); print u[1]; found = 1
			}
			types = ""; suites = ""; uris = ""
		}
		FNR == 1 { flush() }
		FILENAME ~ /\.sources$/ {
			if ($0 ~ /^[ \t]*$/) { flush(); next }
			if ($0 ~ /^#/) next
			key = tolower($1); sub(/^[^:]*:[ \t]*/, "")
			if (key == "types:") types = $0
			else if (key == "suites:") suites = $0
			else if (key == "uris:") uris = $0
			next
		}
		# One-line format: deb [options] URI suite components...
		$1 == "deb" && !found {
			line = $0; sub(/^deb[ \t]+(\[[^]]*\][ \t]+)?/, "", line); split(line, w, /[ \t]+/)
			if (w[2] == want) { print w[1]; found = 1 }
		}
		END { flush() }
	' "${files[@]}" 2>/dev/null) || true
	[[ -n $mirror ]] || {
		tdc__err "no Debian mirror for '$codename' in /etc/apt sources; set TDC_DEBIAN_MIRROR"
		return 1
	}
	printf '%s\n' "${mirror%/}"
}

# Unmounts everything mounted at or below $1 in this mount namespace, deepest first. Normal runs
# mount inside a private namespace and leave nothing behind; this cleans up after older or manual
# runs, and must happen before any `rm -rf` of a chroot (a leftover bind mount of the repo would
# otherwise be deleted through it).
tdc__unmount_below() {
	local prefix=$1 mp
	local -a found=()
	while read -r _ mp _; do
		mp=$(printf '%b' "${mp//\\/\\0}") # /proc/mounts escapes spaces etc. as \040
		[[ $mp == "$prefix" || $mp == "$prefix"/* || $mp == "$prefix".* ]] && found+=("$mp")
	done </proc/mounts
	((${#found[@]})) || return 0
	tdc__say "swift: unmounting ${#found[@]} leftover mount(s) under $prefix"
	local sorted
	sorted=$(printf '%s\n' "${found[@]}" | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-)
	while IFS= read -r mp; do
		umount -- "$mp" 2>/dev/null || umount -l -- "$mp" || { tdc__err "cannot unmount $mp"; return 1; }
	done <<<"$sorted"
}

# Runs "$@" with /proc mounted in chroot $1 and each directory of the colon-separated list $2
# bind-mounted at the same path inside it. Mounts are made in a private mount namespace (unshare), so
# they are invisible to the rest of the machine and vanish with the process even if it is killed
# with SIGKILL; the trap unmounts them anyway. Exit status of "$@" is preserved.
tdc__chroot_mounted() {
	local root=$1 binds=$2
	shift 2
	local inner
	# shellcheck disable=SC2016 # expanded by the inner shell
	inner='
		root=$1 binds=$2; shift 2
		mounted=()
		cleanup() {
			local i
			for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
				umount -- "${mounted[i]}" 2>/dev/null || umount -l -- "${mounted[i]}"
			done
		}
		trap cleanup EXIT
		trap "exit 129" HUP; trap "exit 130" INT; trap "exit 143" TERM
		mount -t proc proc "$root/proc" || exit 1
		mounted+=("$root/proc")
		IFS=: read -r -a dirs <<<"$binds"
		for d in "${dirs[@]}"; do
			[[ -n $d ]] || continue
			mkdir -p -- "$root$d" && mount --bind -- "$d" "$root$d" || exit 1
			mounted+=("$root$d")
		done
		rc=0
		"$@" || rc=$?
		exit "$rc"
	'
	if unshare --mount --propagation private -- true 2>/dev/null; then
		unshare --mount --propagation private -- bash -c "$inner" tdc-chroot "$root" "$binds" "$@"
	else
		# No mount namespaces here: mount in the host namespace; the trap still unmounts, but a
		# SIGKILLed run leaves mounts behind for the next run to clean, and concurrent runs may
		# unmount each other's (tdc__unmount_below).
		bash -c "$inner" tdc-chroot "$root" "$binds" "$@"
	fi
}

# A clean environment for the chroot: the host's PATH (pyenv shims, cargo, ...) means nothing there.
tdc__chroot_env() {
	printf '%s\n' env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" DEBIAN_FRONTEND=noninteractive \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
}

tdc__build_swift_chroot() {
	local cache root partial log mirror
	cache=$(tdc__cache)
	root=$(tdc__swift_root)
	[[ -f $root/.tdc-complete ]] && return 0 # another process finished while we waited for the lock
	partial=$root.partial
	log=$cache/swift-chroot.log
	local -a cenv
	mapfile -t cenv < <(tdc__chroot_env)

	if ! command -v debootstrap >/dev/null 2>&1; then
		tdc__say "swift: installing debootstrap"
		tdc__apt_install debootstrap || return 1
	fi
	mirror=$(tdc__debian_mirror) || return 1

	# Leftovers of an interrupted build are discarded, never resumed: we cannot tell how far they got.
	tdc__unmount_below "$root" || return 1
	rm -rf --one-file-system -- "$partial" || { tdc__err "cannot remove $partial"; return 1; }

	tdc__say "swift: debootstrap $TDC_SWIFT_SUITE from $mirror (several minutes, ~3 GB; log: $log)"
	local -a include=()
	[[ $mirror == https:* ]] && include=(--include=ca-certificates)
	: >"$log"
	debootstrap --variant=minbase "${include[@]}" "$TDC_SWIFT_SUITE" "$partial" "$mirror" >>"$log" 2>&1 || {
		tdc__err "debootstrap failed; last lines of $log:"
		tail -n 20 -- "$log" >&2
		return 1
	}
	cp -L /etc/resolv.conf "$partial/etc/resolv.conf" 2>/dev/null || true

	tdc__say "swift: installing $TDC_SWIFT_PACKAGES in the chroot"
	tdc__chroot_mounted "$partial" "" "${cenv[@]}" chroot "$partial" /bin/sh -ec "
		apt-get -q -o Acquire::Retries=3 update
		apt-get -y -q -o Acquire::Retries=3 install --no-install-recommends $TDC_SWIFT_PACKAGES
		apt-get clean
		swift --version" >>"$log" 2>&1 || {
		tdc__err "installing Swift in the chroot failed; last lines of $log:"
		tail -n 20 -- "$log" >&2
		return 1
	}

	# Marker first, then an atomic rename: an interrupted build is never mistaken for a usable one.
	date -u +%FT%TZ >"$partial/.tdc-complete" || return 1
	rm -rf --one-file-system -- "$root" && mv -T -- "$partial" "$root" || {
		tdc__err "cannot move $partial to $root"
		return 1
	}
}

tdc_ensure_swift() {
	local cache root
	cache=$(tdc__cache)
	root=$(tdc__swift_root)
	mkdir -p -- "$cache" || { tdc__err "cannot create $cache"; return 1; }
	if [[ ! -f $root/.tdc-complete ]]; then
		[[ $(id -u) == 0 ]] || { tdc__err "building the Swift chroot needs root"; return 1; }
		tdc__with_lock "$cache/swift-chroot.lock" tdc__build_swift_chroot || return 1
	fi
	export TDC_SWIFT_ROOT=$root
	tdc__say "swift: ready (chroot $TDC_SWIFT_ROOT)"
}

# tdc_in_swift_chroot HOST_DIR CMD...
# Runs CMD inside the Swift chroot with HOST_DIR bind-mounted at the same path and as the working
# directory, so paths printed by the compiler are valid on the host too. A single CMD argument is a
# shell command line (pipes, &&, VAR=x ... allowed); several arguments are run as-is, without a shell
# re-parsing them. Extra host directories to bind (e.g. an out-of-tree cargo target dir holding the
# .so) may be listed, colon-separated, in TDC_SWIFT_EXTRA_BINDS. The environment inside is clean
# (HOME=/root, standard PATH); set LD_LIBRARY_PATH etc. in CMD. Returns CMD's exit status.
tdc_in_swift_chroot() {
	if (($# < 2)); then
		tdc__err "usage: tdc_in_swift_chroot HOST_DIR CMD..."
		return 2
	fi
	local root
	root=${TDC_SWIFT_ROOT:-$(tdc__swift_root)}
	[[ -f $root/.tdc-complete ]] || { tdc__err "no Swift chroot at $root; call tdc_ensure_swift first"; return 1; }

	local -a dirs=()
	local d real binds=""
	IFS=: read -r -a dirs <<<"$1${TDC_SWIFT_EXTRA_BINDS:+:$TDC_SWIFT_EXTRA_BINDS}"
	for d in "${dirs[@]}"; do
		[[ -n $d ]] || continue
		real=$(realpath -e -- "$d" 2>/dev/null) && [[ -d $real ]] || {
			tdc__err "not a directory: $d"
			return 1
		}
		# Binding over the chroot's own system directories would break it.
		case $real in
		/ | /proc | /proc/* | /sys | /sys/* | /dev | /dev/* | /usr | /usr/* | /etc | /etc/* | /bin | /sbin | /lib* | "$root" | "$root"/*)
			tdc__err "refusing to bind $real into the chroot"
			return 1
			;;
		esac
		binds+=${binds:+:}$real
	done
	local workdir=${binds%%:*}
	shift

	local cmd
	if (($# == 1)); then cmd=$1; else cmd=$(printf '%q ' "$@"); fi
	local -a cenv
	mapfile -t cenv < <(tdc__chroot_env)

	tdc__unmount_below "$root" || return 1
	tdc__chroot_mounted "$root" "$binds" \
		"${cenv[@]}" chroot "$root" /bin/bash -lc "cd $(printf '%q' "$workdir") && $cmd"
}

# ---------------------------------------------------------------------------------------------------
# Python

tdc_ensure_python() {
	local py
	py=$(command -v python3) || { tdc__err "python3 not found"; return 1; }
	# A pyenv shim can exist while its interpreter does not; ctypes is what UniFFI's Python uses.
	"$py" -c 'import ctypes' || { tdc__err "$py does not run (or lacks ctypes)"; return 1; }
	export TDC_PYTHON=$py
	tdc__say "python: ready ($TDC_PYTHON)"
}

# ---------------------------------------------------------------------------------------------------

# Executed rather than sourced: ensure the toolchains named on the command line (default: all).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	set -euo pipefail
	(($#)) || set -- kotlin swift python
	for tdc__t in "$@"; do
		case $tdc__t in
		kotlin | swift | python) "tdc_ensure_$tdc__t" ;;
		*)
			tdc__err "unknown toolchain '$tdc__t' (kotlin, swift, python)"
			exit 2
			;;
		esac
	done
fi
