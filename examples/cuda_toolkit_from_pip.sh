#!/usr/bin/env bash
# Builds tuneforge with `--features cuda` on a machine that has pip but no
# system CUDA toolkit: NVIDIA's CUDA 13 wheels on PyPI carry nvcc, the headers
# and the runtime, laid out like a toolkit under nvidia/cu13.
#
#   bash examples/cuda_toolkit_from_pip.sh            # toolkit into ./.cuda, then build
#   CUDA_COMPUTE_CAP=90 bash examples/cuda_toolkit_from_pip.sh   # H100/H200 (sm_90)
#
# This builds the library with its CUDA kernels. Linking the example binaries
# also needs the libraries candle links against: the NVIDIA driver's libcuda
# (present on a GPU machine), and cuBLAS, cuRAND, NVRTC and cudart, which the
# wheels nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc and nvidia-cuda-runtime
# carry; put their lib folders on LIBRARY_PATH and LD_LIBRARY_PATH, then run
# `cargo build --release --features cuda --examples`.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${CUDA_WHEELS_DIR:-.cuda}"
# cudarc 0.19 (under candle 0.11) knows CUDA up to 13.4: pin the toolkit to it.
version="${CUDA_WHEEL_VERSION:-13.4.92}"
python3 -m pip download --no-deps -q -d "$dest/wheels" \
  "nvidia-cuda-nvcc==$version" "nvidia-cuda-crt==$version" "nvidia-cuda-runtime==$version" \
  "nvidia-nvvm==$version" nvidia-cuda-cccl
for w in "$dest"/wheels/*.whl; do python3 -m zipfile -e "$w" "$dest/unpacked"; done
root="$(cd "$dest/unpacked/nvidia/cu13" && pwd)"
chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root" PATH="$root/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -1
cargo build --release --features cuda --lib
