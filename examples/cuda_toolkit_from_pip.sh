#!/usr/bin/env bash
# Builds tuneforge with `--features cuda` from NVIDIA's CUDA 13 wheels on PyPI,
# on a machine that has pip but no system CUDA toolkit. No GPU is needed to
# build: the library, the examples and the test binaries all link.
#
#   bash examples/cuda_toolkit_from_pip.sh                       # H100/H200 (sm_90)
#   CUDA_COMPUTE_CAP=80 bash examples/cuda_toolkit_from_pip.sh   # A100 (sm_80)
#   CUDA_WHEEL_VERSION=13.4.92 bash examples/cuda_toolkit_from_pip.sh
#
# Pick a toolkit no newer than the CUDA version your driver reports (top right
# of `nvidia-smi`): candle's kernels are PTX that the driver compiles as they
# load, and a driver rejects PTX from a newer toolkit. The default, 13.0, runs on
# every CUDA 13 driver (R580 and later). cudarc 0.19 knows CUDA up to 13.4.
#
# The wheels land in .cuda/<version>, the build in target/cuda. The binaries
# need cuBLAS, cuRAND and NVRTC at run time: the script ends by printing the
# LD_LIBRARY_PATH that finds the copies it fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${CUDA_WHEEL_VERSION:-13.0.88}"
series="${version%.*}" # 13.0
dest="${CUDA_WHEELS_DIR:-.cuda}/$version"

# Toolkit (nvcc, headers, runtime) and the libraries candle links against.
python3 -m pip download --no-deps -q -d "$dest/wheels" \
  "nvidia-cuda-nvcc==$version" "nvidia-cuda-crt==$version" "nvidia-nvvm==$version" \
  "nvidia-cuda-runtime==$version" "nvidia-cuda-nvrtc==$version" \
  "nvidia-cuda-cccl==$series.*" "nvidia-cublas==$series.*" "nvidia-curand"
for w in "$dest"/wheels/*.whl; do python3 -m zipfile -e "$w" "$dest/unpacked"; done
root="$(cd "$dest/unpacked/nvidia/cu13" && pwd)"
chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
lib="$root/lib"
# The wheels carry only versioned names (libcublas.so.13); the linker wants libcublas.so.
for so in "$lib"/lib*.so.*; do
  base="${so%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
done

# libcuda belongs to the NVIDIA driver, not to the toolkit. Link against a stub
# that exports the driver API's names under the driver's soname, libcuda.so.1, as
# the toolkit's own lib/stubs/libcuda.so does: at run time the real driver loads.
# Each stub function returns CUDA_ERROR_STUB_LIBRARY (34).
cudarc="$(cargo metadata --format-version 1 --features cuda |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')"
mkdir -p "$lib/stubs"
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | awk '{print "int " $4 "(void) { return 34; }"}' |
  sort -u >"$lib/stubs/libcuda.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/libcuda.c"

export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root" PATH="$root/bin:$PATH"
export LIBRARY_PATH="$lib/stubs:$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
nvcc --version | tail -1
cargo build --release --features cuda --lib --examples --tests
echo "built into $CARGO_TARGET_DIR/release; to run on a GPU machine:"
echo "  export LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
