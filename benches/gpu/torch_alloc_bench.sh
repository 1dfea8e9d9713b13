#!/usr/bin/env bash
# GPU host, from the repository root with the carried .gpu/ (benches/gpu/prepare_torch_tests.sh
# puts libstreamalloc.so there): builds benches/gpu/torch_alloc_bench.cpp against the host's
# torch and measures torch allocation pairs/s per thread count, from C++, for PyTorch's
# native allocator, its cudaMallocAsync backend (the seed), and streamalloc through torch's
# plain CUDAPluggableAllocator, through the shim with the base class's bookkeeping, and
# through the shim's direct path. One process per variant. Writes $OUT/torch_alloc_bench.csv
# (gpu,variant,api,threads,mpairs_per_s) and prints a table per API.
# Env: ITERS (per thread, default 50000), MAXT (16), GPU_DIR (.gpu), OUT (./out).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPU=${GPU_DIR:-$ROOT/.gpu}
OUT=${OUT:-$PWD/out}
ITERS=${ITERS:-50000}
MAXT=${MAXT:-16}
mkdir -p "$OUT"
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | sed 's/^ *//; s/ *$//')
echo "card: $NAME; $(nproc) CPU cores"
TP=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')
CU=$(dirname "$(dirname "$(command -v nvcc)")")
BIN=${TMPDIR:-/tmp}/torch_alloc_bench
g++ -O2 -std=c++20 "$ROOT/benches/gpu/torch_alloc_bench.cpp" -I"$ROOT/src/capi" \
  -I"$TP/include" -I"$TP/include/torch/csrc/api/include" -I"$CU/include" -L"$TP/lib" \
  -Wl,--no-as-needed -ltorch_cuda -ltorch_cpu -ltorch -lc10_cuda -lc10 -Wl,--as-needed \
  -L"$CU/lib64" -lcudart -ldl -Wl,-rpath,"$TP/lib" -Wl,-rpath,"$CU/lib64" -pthread -o "$BIN" \
  || { echo "torch_alloc_bench: build FAILED"; exit 1; }
CSV=$OUT/torch_alloc_bench.csv
echo "gpu,variant,api,threads,mpairs_per_s" >"$CSV"
FAILED=0
for V in native cudaMallocAsync streamalloc_pluggable streamalloc_shim_bookkeeping streamalloc_shim; do
  if [ "$V" = cudaMallocAsync ]; then CONF=backend:cudaMallocAsync; else CONF=; fi
  PYTORCH_CUDA_ALLOC_CONF=$CONF timeout 300 "$BIN" "$V" "$ITERS" "$MAXT" "$GPU/libstreamalloc.so" \
    >"$OUT/torch_alloc_bench-$V.log" 2>&1 || { echo "$V FAILED:"; tail -5 "$OUT/torch_alloc_bench-$V.log"; FAILED=1; }
  grep -E "^$V,(raw|dataptr),[0-9]+," "$OUT/torch_alloc_bench-$V.log" | sed "s|^|$NAME,|" >>"$CSV"
done
for API in raw dataptr; do
  echo
  echo "M torch allocation pairs/s ($API API), aggregate, $NAME"
  awk -F, -v api="$API" 'NR > 1 && $3 == api {
      if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 }
      if (!($4 in tseen)) { tseen[$4] = 1; ts[++m] = $4 }
      v[$2, $4] = $5 }
    END {
      printf "%-30s", "variant \\ threads"; for (j = 1; j <= m; j++) printf "%9s", ts[j]; printf "\n"
      for (i = 1; i <= n; i++) { printf "%-30s", order[i]
        for (j = 1; j <= m; j++) printf "%9s", v[order[i], ts[j]]; printf "\n" } }' "$CSV"
done
exit $FAILED
