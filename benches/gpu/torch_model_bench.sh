#!/usr/bin/env bash
# GPU host, from the repository root with the carried .gpu/ folder (made by
# benches/gpu/prepare_torch_tests.sh on the build machine): the PyTorch model benchmark
# of issue 10 (benches/gpu/torch_model_bench.py: a varying-length transformer training
# under native, cudaMallocAsync, streamalloc and streamalloc release:fast, interleaved).
#
# streamalloc_torch comes from the wheel in .gpu/wheel, installed the way a user would
# (pip, offline, into .gpu/site so the host's Python stays as it is; as torch_tests.sh
# does); without a wheel, from .gpu/libstreamalloc.so with the module of this checkout.
# The PyTorch shim is built once up front (cached in .gpu/shim_cache, shared with
# torch_tests.sh), so a build failure is reported on its own.
#
# Arguments go to torch_model_bench.py (--reps, --steps, --modes, --extra-mode, ...;
# --dry-run: CPU, tiny sizes, streamalloc on its simulated device: no GPU needed).
# Env: GPU_DIR (.gpu), OUT (./out), PYTHON (python3), TOTAL_S (450: counted from this
# script's start, no run starts after TOTAL_S - 40 seconds, and a round beyond the third
# starts only if it should end by TOTAL_S - 100).
# Writes $OUT/torch_model_bench{.csv,_summary.csv,.log,.json} and torch_model_env.txt; the
# summary table is printed last; exit status 0 when every run succeeded. Defaults: about
# 4 minutes on an H100 (5 rounds of 4 modes), at most 8.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPU=${GPU_DIR:-$ROOT/.gpu}
OUT=${OUT:-$PWD/out}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-450}
mkdir -p "$OUT"
DRY=0
for a in "$@"; do
  case $a in --dry-run | --device=cpu) DRY=1 ;; esac
done
[[ " $* " == *" --device cpu "* ]] && DRY=1
{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  else
    echo "nvidia-smi not found"
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "$(nproc) CPU cores"
} 2>&1 | tee "$OUT/torch_model_env.txt"

shopt -s nullglob
WHEELS=("$GPU"/wheel/streamalloc_torch-*.whl)
shopt -u nullglob
unset STREAMALLOC_LIB STREAMALLOC_SHIM_SRC
if [ ${#WHEELS[@]} -gt 0 ]; then
  rm -rf "$GPU/site"
  "$PY" -m pip install --no-deps --no-index --target "$GPU/site" "${WHEELS[@]}" \
    >"$OUT/torch_model_pip_install.log" 2>&1 \
    || { echo "pip install FAILED"; cat "$OUT/torch_model_pip_install.log"; exit 1; }
  export PYTHONPATH="$GPU/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ -f "$GPU/libstreamalloc.so" ]; then
  export STREAMALLOC_LIB="$GPU/libstreamalloc.so"
  export PYTHONPATH="$ROOT/src/capi/python${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "neither $GPU/wheel/streamalloc_torch-*.whl nor $GPU/libstreamalloc.so: run"
  echo "benches/gpu/prepare_torch_tests.sh on the build machine and carry .gpu"
  exit 1
fi
export STREAMALLOC_SHIM_CACHE="$GPU/shim_cache"
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME
fi
if [ $DRY = 0 ]; then
  STREAMALLOC_VERBOSE=1 "$PY" -c "import streamalloc_torch as s; print('package:', s.__file__); s._load(s._find_lib(None)); s._build_shim(); print('shim built; config', s.config())" \
    >"$OUT/torch_model_shim_build.log" 2>&1 \
    || { echo "shim build FAILED"; tail -50 "$OUT/torch_model_shim_build.log"; exit 1; }
  grep -E "^(package|shim built)" "$OUT/torch_model_shim_build.log"
else
  STREAMALLOC_BACKEND=sim "$PY" -c "import streamalloc_torch as s; print('package:', s.__file__); s._load(s._find_lib(None)); print('library', s.lib_path(), 'config', s.config())" 2>&1 \
    | grep -E "^(package|library)|Error"
fi
# The whole script within TOTAL_S: the runs' deadline and the rounds' budget count what
# the install and the shim build took (arguments given to this script win).
LEFT=$((TOTAL_S - SECONDS))
exec "$PY" "$ROOT/benches/gpu/torch_model_bench.py" --out "$OUT" \
  --deadline-s $((LEFT > 100 ? LEFT - 40 : 60)) --budget-s $((LEFT > 160 ? LEFT - 100 : 60)) "$@"
