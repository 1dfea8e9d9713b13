#!/usr/bin/env bash
# GPU host, from the repository root with the carried .gpu/ folder (made by
# benches/gpu/prepare_torch_tests.sh): builds the PyTorch shim (cached in .gpu/),
# runs src/capi/python/test_torch.py's tests in subprocesses (native, cudaMallocAsync,
# streamalloc) and writes torch_tests.log / torch_tests.json to $OUT.
set -uo pipefail
GPU=${GPU_DIR:-$PWD/.gpu}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/torch_env.txt"
export STREAMALLOC_LIB="$GPU/libstreamalloc.so"
export STREAMALLOC_SHIM_SRC="$GPU/torch_shim.cpp"
export STREAMALLOC_SHIM_CACHE="$GPU/shim_cache"
export STREAMALLOC_VERBOSE=1
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME
fi
# Build the shim once, up front, so a build failure is reported on its own.
python3 -c "import sys; sys.path.insert(0, '$GPU'); import streamalloc_torch as s; s._load(s._find_lib(None)); s._build_shim(); print('shim built')" \
  > "$OUT/shim_build.log" 2>&1 || { echo "shim build FAILED"; tail -50 "$OUT/shim_build.log"; }
python3 "$GPU/test_torch.py" --out "$OUT"
