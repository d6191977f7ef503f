#!/usr/bin/env bash
# Builds the GPU check (examples/gpu_check.rs) with --features cuda --release on a machine
# without a GPU, and packs it with the golden traces and the torch comparison script into one
# folder of at most 64 MiB: dist/gpu-check/. Copy that folder to the GPU machine and run
#   ./run.sh [RESULTS_DIR]
# there (it needs the machine's NVIDIA driver and the CUDA 13 libraries of its python's
# nvidia-* packages, which PyTorch brings; results land in RESULTS_DIR, default ./results).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_LINK=1 . scripts/cuda_toolchain.sh
cargo build --release --features cuda --example gpu_check
bin="${CARGO_TARGET_DIR:-target}/release/examples/gpu_check"
out=dist/gpu-check
rm -rf "$out"
mkdir -p "$out/traces"
cp "$bin" "$out/gpu_check"
strip "$out/gpu_check"
gzip -9 "$out/gpu_check"  # candle's embedded PTX makes the binary large; PTX compresses well
cp tests/data/conformance/*.safetensors "$out/traces/"
cp scripts/bench_torch.py "$out/"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the candle-optim GPU check: conformance on CUDA, then the bandwidth bench with the torch
# comparison. Usage: ./run.sh [RESULTS_DIR]   (PYTHON=... selects the python with torch)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
res=${1:-$here/results}
py=${PYTHON:-python3}
# The CUDA libraries (cudart, nvrtc, curand, cublas) come from the python's nvidia-* wheels.
site=$("$py" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
if [ -n "$site" ]; then
  for d in "$site"/nvidia/cu13/lib "$site"/nvidia/*/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  export LD_LIBRARY_PATH
fi
[ -x "$here/gpu_check" ] || { gunzip -c "$here/gpu_check.gz" > "$here/gpu_check"; chmod +x "$here/gpu_check"; }
exec "$here/gpu_check" --traces "$here/traces" --out "$res" --torch "$py" \
  --torch-script "$here/bench_torch.py" "${@:2}"
RUN
chmod +x "$out/run.sh"
size=$(du -sb "$out" | cut -f1)
echo "packed $out: $((size / 1024 / 1024)) MiB"
[ "$size" -le $((64 * 1024 * 1024)) ] || { echo "pack is larger than 64 MiB" >&2; exit 1; }
