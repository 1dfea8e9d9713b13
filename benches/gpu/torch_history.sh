#!/usr/bin/env bash
# History, snapshots, OOM observers and torch.compile: one script, two steps.
#
#   benches/gpu/torch_history.sh prepare   # build machine: fills .gpu-history/ (git-ignored)
#   benches/gpu/torch_history.sh run       # GPU host, repo root, .gpu-history/ carried
#
# prepare builds, release and stripped: libstreamalloc.so and streamalloc-bench of this
# checkout, and streamalloc-bench of BASE (default: the merge base with main), the
# allocator without the history hooks; copies the PyTorch shim and tests.
# run (about 3 minutes) writes under $OUT:
#   history-bench.csv / .log   cached rows, handle and pointer API, of BASE (hooks absent),
#                              this build with history off, and with history on; the two
#                              binaries alternate, REPS times each
#   torch_tests.log / .json    test_torch.py's snapshot, history, oom_observer and compile
#                              tests, each on PyTorch's native allocator and streamalloc
# and prints both tables last, with the card's name.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DIR=${HISTORY_DIR:-$ROOT/.gpu-history}

prepare() {
  set -e
  BASE=${BASE:-$(git merge-base HEAD main)}
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  rm -rf "$DIR" && mkdir -p "$DIR"
  EXCLUDE=$(git rev-parse --git-path info/exclude)
  git check-ignore -q .gpu-history || echo '/.gpu-history/' >>"$EXCLUDE"
  cargo build --release --lib --bin streamalloc-bench
  cp "$CARGO_TARGET_DIR/release/libstreamalloc.so" "$CARGO_TARGET_DIR/release/streamalloc-bench" "$DIR/"
  SRC=$(mktemp -d)
  git archive "$BASE" | tar -x -C "$SRC"
  (cd "$SRC" && CARGO_TARGET_DIR="$ROOT/target/history-base" cargo build --release --bin streamalloc-bench)
  cp "$ROOT/target/history-base/release/streamalloc-bench" "$DIR/streamalloc-bench-base"
  rm -rf "$SRC"
  strip "$DIR"/libstreamalloc.so "$DIR"/streamalloc-bench "$DIR"/streamalloc-bench-base 2>/dev/null || true
  cp src/capi/python/streamalloc_torch.py src/capi/python/test_torch.py src/capi/torch_shim.cpp \
     src/capi/streamalloc.h "$DIR/"
  echo "base $BASE" >"$DIR/MANIFEST"
  echo "head $(git rev-parse HEAD)$(git diff --quiet HEAD -- src || echo ' (dirty)')" >>"$DIR/MANIFEST"
  du -sh "$DIR"; cat "$DIR/MANIFEST"
  echo "carry .gpu-history and run: benches/gpu/torch_history.sh run"
}

run() {
  OUT=${OUT:-$ROOT/out}
  mkdir -p "$OUT"
  ITERS=${ITERS:-40000}
  REPS=${REPS:-3}
  MAXT=${MAXT:-16}
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | sed 's/^ *//; s/ *$//')
  echo "card: $NAME; $(nproc) CPU cores" | tee "$OUT/history-env.txt"
  cat "$DIR/MANIFEST" | tee -a "$OUT/history-env.txt"
  CSV="$OUT/history-bench.csv"
  : >"$CSV"
  for rep in $(seq 1 "$REPS"); do
    for which in base head; do
      if [ "$which" = base ]; then
        BIN="$DIR/streamalloc-bench-base"; VARS=streamalloc_cached,streamalloc_cached_ptr
      else
        BIN="$DIR/streamalloc-bench"
        VARS=streamalloc_cached,streamalloc_cached_ptr,streamalloc_cached_history,streamalloc_cached_ptr_history
      fi
      "$BIN" --variants "$VARS" --max-threads "$MAXT" --reps 1 --iters "$ITERS" --blocks 0 \
        --gpu-name "$NAME" --csv "$OUT/part.csv" >>"$OUT/history-bench.log" 2>&1 \
        || echo "bench $which rep $rep failed (see history-bench.log)"
      grep -v '^gpu,' "$OUT/part.csv" 2>/dev/null | awk -F, -v w="$which" -v r="$rep" \
        'NF >= 4 { print w "," r "," $0 }' >>"$CSV"
    done
  done
  export STREAMALLOC_LIB="$DIR/libstreamalloc.so" STREAMALLOC_SHIM_SRC="$DIR/torch_shim.cpp"
  export STREAMALLOC_SHIM_CACHE="$DIR/shim_cache" STREAMALLOC_TORCH_TESTS=snapshot,history,oom_observer,compile
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME
  fi
  python3 "$DIR/test_torch.py" --out "$OUT" >"$OUT/torch_history_tests.txt" 2>&1
  TRC=$?
  echo
  echo "== Mpairs/s, median of $REPS alternating runs (card: $NAME)"
  python3 - "$CSV" <<'EOF'
import csv, statistics, sys
rows = {}
for which, rep, gpu, variant, threads, mps in csv.reader(open(sys.argv[1])):
    name = f"{variant} ({'base: no hooks' if which == 'base' else 'this build'})"
    rows.setdefault(name, {}).setdefault(int(threads), []).append(float(mps))
threads = sorted({t for v in rows.values() for t in v})
print(f"{'variant':52}" + "".join(f"{t:>9}" for t in threads))
for name in sorted(rows):
    print(f"{name:52}" + "".join(f"{statistics.median(rows[name].get(t, [float('nan')])):9.2f}" for t in threads))
EOF
  echo
  tail -n 14 "$OUT/torch_history_tests.txt"
  return $TRC
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
