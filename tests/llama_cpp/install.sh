#!/usr/bin/env bash
# Installs llama.cpp, the reference for the GGUF export tests, and prints the
# Python that runs it. llama-cpp-python from PyPI builds llama.cpp from source
# (pip fetches cmake too; about 10 minutes on 2 cores). The build is cached
# outside the clone, in $TUNEFORGE_PEERS (default ~/.cache/tuneforge-peers), so
# later runs on the same machine reuse it. A lock keeps two test processes from
# building at once.
#
# A native build segfaults on quantized models on AMX CPUs, so the instruction
# sets are named: AVX2, FMA, F16C, and AVX-512 where the CPU has it.
set -euo pipefail
VERSION=0.3.36
ROOT="${TUNEFORGE_PEERS:-$HOME/.cache/tuneforge-peers}"
VENV="$ROOT/llama-cpp-python-$VERSION"
mkdir -p "$ROOT"
exec 9>"$ROOT/.llama-cpp.lock"
flock 9
if [ ! -f "$VENV/.installed" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --upgrade pip >&2
  ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  if grep -qw avx512f /proc/cpuinfo; then ARGS="$ARGS -DGGML_AVX512=ON"; fi
  echo "building llama-cpp-python $VERSION into $VENV (about 10 minutes)" >&2
  CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install -q --no-cache-dir "llama-cpp-python==$VERSION" >&2
  touch "$VENV/.installed"
fi
echo "$VENV/bin/python"
