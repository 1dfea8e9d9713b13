#!/usr/bin/env bash
# The cost of the history hooks on the allocator's hot path: one script, two steps.
#
#   benches/gpu/history_bench.sh prepare   # build machine: fills .gpu-history/ (git-ignored)
#   benches/gpu/history_bench.sh run       # GPU host, repo root, .gpu-history/ carried
#
# prepare builds, release and stripped, streamalloc-bench of this checkout twice: as is,
# and with `--cfg streamalloc_no_history_hooks` (the base: the same allocator with every
# history hook compiled out), so the two differ in the hooks alone.
# run (about 2 minutes) writes under $OUT history-bench.csv / .log: the cached rows,
# handle and pointer API, of the base (hooks absent), of this build with history off, and
# with history on; the two binaries alternate, REPS times each. It prints the table
# (median Mpairs/s per thread count) last, with the card's name.
#
# PyTorch's side of history (recordHistory, snapshots, OOM observers, torch.compile) is
# tested by test_torch.py with the other PyTorch tests: benches/gpu/torch_tests.sh
# (TESTS=snapshot,history,oom_observer,compile for those alone).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DIR=${HISTORY_DIR:-$ROOT/.gpu-history}

# The benchmark binary, release: a workspace member (benches/streamalloc-bench) in newer
# trees, a binary of the root package in older ones.
build_bench() {
  if [ -f benches/streamalloc-bench/Cargo.toml ]; then
    cargo build --release -p streamalloc-bench --bin streamalloc-bench
  else
    cargo build --release --bin streamalloc-bench
  fi
}

prepare() {
  set -e
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  rm -rf "$DIR" && mkdir -p "$DIR"
  EXCLUDE=$(git rev-parse --git-path info/exclude)
  git check-ignore -q .gpu-history || echo '/.gpu-history/' >>"$EXCLUDE"
  build_bench
  cp "$CARGO_TARGET_DIR/release/streamalloc-bench" "$DIR/"
  # The same source with the hooks compiled out (History::on() a constant false).
  RUSTFLAGS="${RUSTFLAGS:-} --cfg streamalloc_no_history_hooks" \
    CARGO_TARGET_DIR="$ROOT/target/history-base" build_bench
  cp "$ROOT/target/history-base/release/streamalloc-bench" "$DIR/streamalloc-bench-base"
  strip "$DIR"/streamalloc-bench "$DIR"/streamalloc-bench-base 2>/dev/null || true
  BASE="$(git rev-parse HEAD) with --cfg streamalloc_no_history_hooks"
  echo "base $BASE" >"$DIR/MANIFEST"
  echo "head $(git rev-parse HEAD)$(git diff --quiet HEAD -- src || echo ' (dirty)')" >>"$DIR/MANIFEST"
  du -sh "$DIR"; cat "$DIR/MANIFEST"
  echo "carry .gpu-history and run: benches/gpu/history_bench.sh run"
}

run() {
  OUT=${OUT:-$ROOT/out}
  mkdir -p "$OUT"
  ITERS=${ITERS:-40000}
  REPS=${REPS:-3}
  MAXT=${MAXT:-16}
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | sed 's/^ *//; s/ *$//')
  echo "card: $NAME; $(nproc) CPU cores" | tee "$OUT/history-env.txt"
  tee -a "$OUT/history-env.txt" <"$DIR/MANIFEST"
  CSV="$OUT/history-bench.csv"
  : >"$CSV"
  FAILED=0
  for rep in $(seq 1 "$REPS"); do
    for which in base head; do
      if [ "$which" = base ]; then
        BIN="$DIR/streamalloc-bench-base"; VARS=streamalloc_cached,streamalloc_cached_ptr
      else
        BIN="$DIR/streamalloc-bench"
        VARS=streamalloc_cached,streamalloc_cached_ptr,streamalloc_cached_history,streamalloc_cached_ptr_history
      fi
      rm -f "$OUT/part.csv"
      if ! "$BIN" --variants "$VARS" --max-threads "$MAXT" --reps 1 --iters "$ITERS" --blocks 0 \
        --gpu-name "$NAME" --csv "$OUT/part.csv" >>"$OUT/history-bench.log" 2>&1; then
        echo "bench $which rep $rep FAILED (see history-bench.log)"; FAILED=1
      fi
      grep -v '^gpu,' "$OUT/part.csv" 2>/dev/null | awk -F, -v w="$which" -v r="$rep" \
        'NF >= 4 { print w "," r "," $0 }' >>"$CSV"
    done
  done
  rm -f "$OUT/part.csv"
  echo
  echo "== Mpairs/s, median of $REPS alternating runs (card: $NAME)"
  python3 - "$CSV" <<'PY'
import csv, statistics, sys
rows = {}
for which, rep, gpu, variant, threads, mps in csv.reader(open(sys.argv[1])):
    name = f"{variant} ({'base: no hooks' if which == 'base' else 'this build'})"
    rows.setdefault(name, {}).setdefault(int(threads), []).append(float(mps))
threads = sorted({t for v in rows.values() for t in v})
print(f"{'variant':52}" + "".join(f"{t:>9}" for t in threads))
for name in sorted(rows):
    print(f"{name:52}" + "".join(f"{statistics.median(rows[name].get(t, [float('nan')])):9.2f}" for t in threads))
PY
  return $FAILED
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
