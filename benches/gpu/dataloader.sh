#!/usr/bin/env bash
# The data-loader benchmark and the cudarc interop checks, ON the GPU host, from the repo
# root, with the .gpu/ folder made here by benches/gpu/build.sh (carry .gpu). Writes
# under $OUT (default ./gpu-out):
#   dataloader.csv / dataloader.png / dataloader.log   streamalloc-dataloader, all variants
#   cudarc-example.log                                 examples/cudarc_kernel.rs
#   gpu-tests-interop.log                              the gpu test of the cudarc interop
# and prints the card, each step's outcome and the benchmark's table and goals last.
# Env: GPU_DIR (default .gpu), DL_ARGS (extra arguments for streamalloc-dataloader),
#      DL_TIMEOUT (s, default 420).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
FAILED=0
CARD=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "card: ${CARD:-unknown}" | tee "$OUT/card.txt"

step() { # NAME LOG CMD...
    local name=$1 log=$2
    shift 2
    if "$@" >"$log" 2>&1; then
        echo "$name: ok"
    else
        echo "$name: FAILED (exit $?), see $(basename "$log")"
        FAILED=1
    fi
}

export STREAMALLOC_GPU_REQUIRED=1
step "cudarc example" "$OUT/cudarc-example.log" timeout 120 "$GPU_DIR/bin/cudarc_kernel"
step "gpu interop test" "$OUT/gpu-tests-interop.log" timeout 300 \
    "$GPU_DIR/bin/gpu-tests" gpu_cudarc_kernel_on_pooled_block --test-threads=1 --nocapture
# shellcheck disable=SC2086
step "dataloader bench" "$OUT/dataloader.log" timeout "${DL_TIMEOUT:-420}" \
    "$GPU_DIR/bin/streamalloc-dataloader" --csv "$OUT/dataloader.csv" \
    --png "$OUT/dataloader.png" ${DL_ARGS:-}
echo "--- cudarc example:"; tail -3 "$OUT/cudarc-example.log"
echo "--- interop test:"; grep -E "test result|gpu_cudarc|panicked" "$OUT/gpu-tests-interop.log"
echo "--- dataloader (card: ${CARD:-unknown}):"
sed -n '/^small batches\|^large batches/,$p' "$OUT/dataloader.log"
exit $FAILED
