#!/usr/bin/env python3
"""Writes the to-device-crypto wheel from files that already exist (no build backend needed).

    build_wheel.py --package DIR --lib LIBRARY --version V --out DIR

DIR is bindings/python/to_device_crypto (the hand-written __init__.py and the generated _ffi.py);
LIBRARY the release libto_device_crypto.so, shipped inside the package where _ffi.py loads it. The
tag is py3-none-PLATFORM: the bindings use only ctypes, so one wheel serves every CPython >= 3.8
(checked by hand on 3.8 to 3.13; 3.7 lacks typing.Protocol). PLATFORM is manylinux_2_Y_ARCH when
the library needs nothing but glibc (at most GLIBC_2.Y symbols), libgcc_s and the kernel's loader,
as the manylinux policy allows; otherwise the local linux_ARCH. Prints the wheel's path.
"""

import argparse
import base64
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile

NAME = "to_device_crypto"
DIST_NAME = "to-device-crypto"
SUMMARY = (
    "Decrypt Matrix Olm to-device events with vodozemac; every failure gets one precise name and "
    "a PostHog-ready analytics Error event."
)
# Libraries a manylinux wheel may link against (PEP 600 / the manylinux2014 policy).
MANYLINUX_LIBS = {
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "librt.so.1",
    "libpthread.so.0",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
}


def platform_tag(lib):
    arch = platform.machine()
    local = "linux_" + arch
    if not sys.platform.startswith("linux") or not shutil.which("objdump"):
        return local
    dynamic = subprocess.run(["objdump", "-p", lib], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"^\s*NEEDED\s+(\S+)", dynamic, re.M))
    if not needed <= MANYLINUX_LIBS:
        return local
    symbols = subprocess.run(["objdump", "-T", lib], capture_output=True, text=True, check=True).stdout
    versions = [tuple(map(int, v)) for v in re.findall(r"GLIBC_(\d+)\.(\d+)", symbols)]
    if not versions:
        return local
    major, minor = max(versions)
    return "manylinux_%d_%d_%s" % (major, minor, arch)


def record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return "%s,sha256=%s,%d" % (path, digest, len(data))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", required=True)
    parser.add_argument("--lib", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    tag = "py3-none-" + platform_tag(args.lib)
    dist_info = "%s-%s.dist-info" % (NAME, args.version)
    files = []  # (path in the wheel, bytes); sorted, fixed timestamps: the same inputs, the same wheel
    for source in sorted(os.listdir(args.package)):
        if source.endswith(".py"):
            with open(os.path.join(args.package, source), "rb") as f:
                files.append(("%s/%s" % (NAME, source), f.read()))
    with open(args.lib, "rb") as f:
        files.append(("%s/%s" % (NAME, os.path.basename(args.lib)), f.read()))
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: " + DIST_NAME,
            "Version: " + args.version,
            "Summary: " + SUMMARY,
            "License: Apache-2.0",
            "Requires-Python: >=3.8",
            "",
            "UniFFI bindings of the to-device-crypto Rust crate: `import to_device_crypto`.",
            "",
        ]
    )
    wheel = "\n".join(
        ["Wheel-Version: 1.0", "Generator: to-device-crypto scripts/build-wheel.sh", "Root-Is-Purelib: false", "Tag: " + tag, ""]
    )
    files += [
        (dist_info + "/METADATA", metadata.encode()),
        (dist_info + "/WHEEL", wheel.encode()),
        (dist_info + "/top_level.txt", (NAME + "\n").encode()),
    ]
    record = "".join(record_line(path, data) + "\n" for path, data in files) + dist_info + "/RECORD,,\n"
    files.append((dist_info + "/RECORD", record.encode()))

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "%s-%s-%s.whl" % (NAME, args.version, tag))
    with zipfile.ZipFile(path + ".partial", "w", zipfile.ZIP_DEFLATED) as wheel_zip:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            # rwxr-xr-x for the library, rw-r--r-- for the rest.
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            wheel_zip.writestr(info, data)
    os.replace(path + ".partial", path)
    print(path)


if __name__ == "__main__":
    main()
