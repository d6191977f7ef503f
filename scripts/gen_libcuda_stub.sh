#!/bin/sh
# Writes a link-time stub libcuda.so (SONAME libcuda.so.1) into DIR: every cu* entry point that
# cudarc declares, each returning CUDA_ERROR_STUB_LIBRARY (34), so `-lcuda` resolves on a
# machine without an NVIDIA driver. Never ship it or put it on a GPU machine's library path.
# usage: gen_libcuda_stub.sh DIR   (needs cudarc 0.19 in ~/.cargo/registry: run cargo fetch)
set -e
OUT=${1:?usage: gen_libcuda_stub.sh DIR}
R=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/index*/cudarc-0.19.* 2>/dev/null | sort -V | tail -n 1)
[ -n "$R" ] || { echo "cudarc 0.19 sources not found; run cargo fetch first" >&2; exit 1; }
mkdir -p "$OUT"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$R/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
  | awk '{print "int " $1 "(void) { return 34; }"}' > "$OUT/libcuda_stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$OUT/libcuda.so" "$OUT/libcuda_stub.c"
ln -sf libcuda.so "$OUT/libcuda.so.1"
