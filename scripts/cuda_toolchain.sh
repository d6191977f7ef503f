#!/usr/bin/env bash
# Source this: installs (once) the pinned CUDA 13.0 compiler wheels from PyPI into a venv and
# exports what the `cuda` feature needs on a machine without a GPU or a system CUDA:
# nvcc on PATH, CUDA_ROOT, CUDA_COMPUTE_CAP (no nvidia-smi here), and for linking binaries the
# runtime libraries plus a stub libcuda.so (never shipped, never on a GPU machine's path).
#   . scripts/cuda_toolchain.sh          # compiler only (enough for nvcc -ptx and cargo check)
#   CUDA_LINK=1 . scripts/cuda_toolchain.sh   # also the libraries to link binaries
: "${CUDA_VENV:=$HOME/.cache/candle-optim/cuda-venv}"
_co_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -x "$CUDA_VENV/bin/pip" ]; then
  python3 -m venv "$CUDA_VENV"
fi
_co_site=$("$CUDA_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU="$_co_site/nvidia/cu13"
# Pin every wheel: the nvcc wheel's own requirements are unpinned and pull 13.5 pieces, whose
# PTX a CUDA 13.0 driver cannot JIT.
if [ ! -x "$CU/bin/nvcc" ]; then
  "$CUDA_VENV/bin/pip" install -q --no-deps nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
if [ "${CUDA_LINK:-0}" = 1 ]; then
  if [ ! -e "$CU/lib/libcublas.so.13" ]; then
    "$CUDA_VENV/bin/pip" install -q --no-deps nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 \
      nvidia-cublas==13.1.0.3
  fi
  for l in libcudart.so.13 libnvrtc.so.13 libcurand.so.10 libcublas.so.13 libcublasLt.so.13; do
    ln -sf "$l" "$CU/lib/${l%.so.*}.so"
  done
  [ -e "$CU/lib/stubs/libcuda.so" ] || sh "$_co_here/gen_libcuda_stub.sh" "$CU/lib/stubs"
  export LIBRARY_PATH="$CU/lib:$CU/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi
export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
unset _co_here _co_site
