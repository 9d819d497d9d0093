#!/usr/bin/env bash
# Assemble an aarch64 sysroot that can run a TVM Relax VM under qemu-aarch64.
#
# Why: slimc cross-compiles models for aarch64 and wants to *run* the produced
# shared library on an x86-64 machine.  qemu-user can execute aarch64 binaries,
# but it needs an aarch64 dynamic loader, libc, libstdc++, a Python 3.11 and the
# aarch64 builds of tvm / tvm-ffi / numpy.  All of these come from Debian's
# arm64 archive and PyPI's manylinux aarch64 wheels, so nothing beyond apt and
# pip is required, and nothing arm64 is installed into the host system: the
# .deb files are only unpacked (dpkg -x) into the sysroot folder.
#
# Layout of ${SLIMC_AARCH64_SYSROOT:-$HOME/.cache/slimc/aarch64-sysroot}:
#   lib/, usr/            unpacked Debian bookworm arm64 packages
#   usr/bin/python3.11    the aarch64 interpreter (run as: qemu-aarch64 -L ROOT ...)
#   site-packages/        unpacked aarch64 wheels (tvm, tvm_ffi, numpy, ...)
#   .slimc-sysroot-stamp  written last; its content must match STAMP below
#
# Idempotent: when the stamp matches, the script does nothing.  Run as root
# (dpkg --add-architecture and apt-get update need it).
set -euo pipefail

SYSROOT="${SLIMC_AARCH64_SYSROOT:-$HOME/.cache/slimc/aarch64-sysroot}"
SYSROOT="${SYSROOT%/}"
PY="${PYTHON:-python3}"

# Debian packages whose files python3.11 and the TVM runtime actually load.
# python3.11's other optional extension modules (readline, sqlite3, dbm, curses,
# nis) are never imported by the runner, so their libraries are left out.
DEBS=(
    libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0
    liblzma5 libuuid1 libcrypt1
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
)
# apache-tvm needs apache-tvm-ffi, numpy, typing_extensions and (optionally, for
# bfloat16/float8 tensors) ml_dtypes.  --no-deps keeps pip from resolving the
# host-only dependencies of the full compiler wheel.
WHEELS=(
    'apache-tvm==0.27.0.post1' 'apache-tvm-ffi<0.1.15' 'numpy>=1.26'
    'typing_extensions>=4.13' 'ml_dtypes'
)
# Bump the trailing "v" number whenever the recipe changes so old sysroots rebuild.
STAMP="v1 ${DEBS[*]} ${WHEELS[*]}"
STAMP_FILE="$SYSROOT/.slimc-sysroot-stamp"

# Two checkouts (or parallel CI jobs) assembling the same sysroot would delete each other's
# partial tree: hold a lock for the whole build and re-check the stamp once it is ours.
mkdir -p "$(dirname "$SYSROOT")"
exec 9>"$SYSROOT.lock"
flock 9

if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]]; then
    echo "aarch64 sysroot already complete: $SYSROOT"
    exit 0
fi

if ! command -v qemu-aarch64 >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    PY=python3
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PARTIAL="$SYSROOT.partial"
rm -rf "$PARTIAL"
mkdir -p "$PARTIAL/site-packages" "$WORK/debs" "$WORK/wheels"

# 1. Debian arm64 packages, unpacked only.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
fi
apt-get update -qq
chmod 755 "$WORK" && chmod 777 "$WORK/debs"  # let apt's unprivileged _apt user write
(cd "$WORK/debs" && apt-get download -qq "${DEBS[@]/%/:arm64}")
for deb in "$WORK"/debs/*.deb; do
    dpkg -x "$deb" "$PARTIAL"
done

# 2. aarch64 wheels, unpacked into site-packages.  The 230 MiB compiler library
# and CUDA runtime are skipped: in the sysroot tvm only ever runs as a runtime
# (tvm.base falls back to runtime-only mode when libtvm_compiler is absent).
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp \
    --abi cp311 --abi abi3 --abi none -d "$WORK/wheels" "${WHEELS[@]}"
"$PY" - "$PARTIAL/site-packages" "$WORK"/wheels/*.whl <<'EOF'
import sys
import zipfile

SKIP = ("tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so",
        "tvm/3rdparty/", "tvm/src/", "tvm/web/", "tvm/include/")
dest = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest, [n for n in zf.namelist() if not n.startswith(SKIP)])
EOF

# 3. Move into place, then byte-compile everything with the aarch64 interpreter
# itself: Debian ships its stdlib without .pyc files and wheels ship none, and
# compiling on every emulated run would cost seconds.  This doubles as a smoke
# test that the interpreter, its loader and the TVM runtime load under qemu.
rm -rf "$SYSROOT"
mkdir -p "$(dirname "$SYSROOT")"
mv "$PARTIAL" "$SYSROOT"
run_py() {
    qemu-aarch64 -L "$SYSROOT" \
        -E PYTHONHOME="$SYSROOT/usr" -E PYTHONPATH="$SYSROOT/site-packages" \
        "$SYSROOT/usr/bin/python3.11" "$@"
}
run_py -m compileall -q -j 0 "$SYSROOT/usr/lib/python3.11" "$SYSROOT/site-packages" \
    >/dev/null || true
run_py - "$SYSROOT/site-packages/tvm/lib/libtvm_runtime.so" <<'EOF'
import ctypes
import sys

import numpy
import tvm_ffi

ctypes.CDLL(sys.argv[1], ctypes.RTLD_GLOBAL)
assert tvm_ffi.get_global_func("vm.builtin.alloc_storage") is not None
EOF

echo "$STAMP" >"$STAMP_FILE"
echo "aarch64 sysroot ready: $SYSROOT"
