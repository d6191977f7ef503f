#!/usr/bin/env bash
# Checks the CUDA kernels' state formats and stochastic rounding without a GPU: runs the
# kernels of kernels/adamw.cu and kernels/codec.cu on the CPU (emu.cpp, a thread per CUDA
# thread) and compares them bit for bit with the crate's CPU optimizer (ref/). See README.md.
#   scripts/kernel_emu/run.sh            # every case, both paths, aligned and unaligned
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${EMU_WORK:-$(mktemp -d)}
(cd "$here/ref" && cargo build --quiet)
ref_bin="${CARGO_TARGET_DIR:-$here/ref/target}/debug/emu-ref"
"$ref_bin" "$work/data" >/dev/null
g++ -std=c++20 -O2 -ffp-contract=off -fno-fast-math -Wno-unknown-pragmas -pthread \
  -I"$here/shim" -I"$repo/kernels" "$here/emu.cpp" -o "$work/emu"
fail=0
for d in "$work"/data/*/; do
  case=$(basename "$d")
  for mode in direct copies; do
    for skew in 0 1; do
      for verdict in host verdict; do
        "$work/emu" "$work/data" "$case" "$mode" "$skew" "$verdict" || fail=1
      done
    done
  done
done
[ "$fail" = 0 ] && echo "kernel emulation: all cases equal the CPU" || echo "kernel emulation: FAILED"
exit "$fail"
