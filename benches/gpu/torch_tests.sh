#!/usr/bin/env bash
# GPU host, from the repository root with the carried .gpu/ folder (made by
# benches/gpu/prepare_torch_tests.sh): installs the streamalloc_torch wheel the way a user
# would (pip, offline, into .gpu/site so the host's Python stays as it is), builds the
# PyTorch shim (cached in .gpu/shim_cache), runs test_torch.py's tests in subprocesses
# (native, cudaMallocAsync, streamalloc) and writes torch_tests.log / torch_tests.json to
# $OUT. The one script for the one-GPU PyTorch run: by default every test in
# test_torch.py (the issue's table, train, record_stream, threads, oom, graph, and
# PyTorch's memory tools: snapshot, history, oom_observer, compile; the 2-GPU ones skip
# on one GPU). TESTS=a,b limits the tests.
# The last lines are the table; "N passed (S skipped), 0 failed" means success, followed
# by "; U not supported (...)" for the known refusals (the seed's memory tools, and
# compile under streamalloc).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPU=${GPU_DIR:-$ROOT/.gpu}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/torch_env.txt"
rm -rf "$GPU/site"
python3 -m pip install --no-deps --no-index --target "$GPU/site" "$GPU"/wheel/streamalloc_torch-*.whl \
  >"$OUT/pip_install.log" 2>&1 || { echo "pip install FAILED"; cat "$OUT/pip_install.log"; exit 1; }
export PYTHONPATH="$GPU/site${PYTHONPATH:+:$PYTHONPATH}"
unset STREAMALLOC_LIB STREAMALLOC_SHIM_SRC
export STREAMALLOC_SHIM_CACHE="$GPU/shim_cache"
export STREAMALLOC_VERBOSE=1
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME
fi
# Import the installed package and build the shim once, up front, so that a build
# failure is reported on its own.
python3 -c "import streamalloc_torch as s; print('package:', s.__file__); s._load(s._find_lib(None)); s._build_shim(); print('shim built; config', s.config())" \
  >"$OUT/shim_build.log" 2>&1 || { echo "shim build FAILED"; tail -50 "$OUT/shim_build.log"; }
head -1 "$OUT/shim_build.log"
ARGS=(--out "$OUT")
[ -n "${TESTS:-}" ] && ARGS+=(--tests "$TESTS")
python3 "$GPU/tests/test_torch.py" "${ARGS[@]}"
