#!/usr/bin/env bash
# Bookkeeping alone (null driver), two builds on one host: a baseline build and the new
# one, run alternately, plus the new one with its asymmetric fences switched off
# (STREAMALLOC_ASYMMETRIC_FENCE=0). The seed replica's rows come with every run.
#
#   build machine:  mkdir -p .gpu-ab; cp <old>/streamalloc-bench .gpu-ab/base;
#                   cp target/release/streamalloc-bench .gpu-ab/new   (both git-ignored)
#   GPU host:       bash benches/gpu/null_ab.sh        (repo root, .gpu-ab carried)
#
# Writes under $OUT: null-ab.csv (build,round,gpu,variant,threads,mpairs_per_s; medians of
# REPS per run) and null-ab.log. Env: ROUNDS (2), REPS (3), NULL_ITERS (200000 per thread),
# MAXT (16), BASE, NEW.
set -uo pipefail
OUT=${OUT:-$PWD/out}
BASE=${BASE:-.gpu-ab/base}
NEW=${NEW:-.gpu-ab/new}
ROUNDS=${ROUNDS:-2}
REPS=${REPS:-3}
NULL_ITERS=${NULL_ITERS:-200000}
MAXT=${MAXT:-16}
VARIANTS=seed_replica_null,streamalloc_null,streamalloc_cached_null
mkdir -p "$OUT"
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | sed 's/^ *//; s/ *$//')
NAME=${NAME:-cpu}
LOG="$OUT/null-ab.log"
CSV="$OUT/null-ab.csv"
{
  echo "host: $(nproc) CPU cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); card: $NAME"
  echo "base: $(sha256sum "$BASE" | cut -c1-16)  new: $(sha256sum "$NEW" | cut -c1-16)"
} | tee "$LOG"
echo "build,round,gpu,variant,threads,mpairs_per_s" >"$CSV"
for round in $(seq "$ROUNDS"); do
  for build in base new new_symmetric; do
    case $build in
      base) bin=$BASE; fence=1 ;;
      new) bin=$NEW; fence=1 ;;
      new_symmetric) bin=$NEW; fence=0 ;;
    esac
    tmp=$(mktemp)
    echo "== round $round, $build" | tee -a "$LOG"
    STREAMALLOC_ASYMMETRIC_FENCE=$fence "$bin" --max-threads "$MAXT" --reps "$REPS" \
      --null-iters "$NULL_ITERS" --variants "$VARIANTS" --gpu-name "$NAME" --csv "$tmp" \
      2>&1 | grep -v '^rep ' | tee -a "$LOG"
    tail -n +2 "$tmp" | sed "s|^|$build,$round,|" >>"$CSV"
    rm -f "$tmp"
  done
done
# Medians over rounds, per build x variant x threads.
echo "== medians over $ROUNDS rounds (M pairs/s)" | tee -a "$LOG"
python3 - "$CSV" <<'PY' | tee -a "$LOG"
import csv, statistics, sys
rows = {}
for r in csv.DictReader(open(sys.argv[1])):
    rows.setdefault((r["variant"], int(r["threads"]), r["build"]), []).append(float(r["mpairs_per_s"]))
for (v, t, b), xs in sorted(rows.items()):
    print(f"{v},{t},{b},{statistics.median(xs):.3f}")
PY
