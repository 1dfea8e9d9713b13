#!/bin/bash
# The driver tier in one GPU run (issue 14). Run ON the GPU host, from the repo root,
# with the carried .gpu/ made here by `bash benches/gpu/prepare.sh`. Writes under $OUT:
#   <card>-lanes.csv   gpu,variant,threads,mpairs_per_s: every driver-tier variant and
#                      the null-driver bookkeeping rows (medians of $REPS), then
#                      PyTorch's anchor rows (torch_cudaMallocAsync, torch_native)
#   <card>-lanes.png   throughput against threads
#   <card>-lanes-bench.log, <card>-lanes-anchor.log
# Variants (src/bin/streamalloc-bench):
#   raw_driver          the driver alone, T threads, a stream each
#   raw_one_thread      the driver alone, ONE thread alternating over N streams (the
#                       threads column is N): the driver's own per-call limit
#   raw_lock, raw_delegate   the driver through each lane, no bookkeeping
#   seed_replica        the seed's design (one mutex), passthrough
#   streamalloc         the lock-free core, passthrough, with the default lane for CUDA
#   streamalloc_{nolane,lock,delegate,delegate_always}   the same with each lane
#   seed_replica_null, streamalloc_null   bookkeeping alone (null driver)
# Then, when .gpu/bin/gpu-tests exists (benches/gpu/build.sh makes it), the GPU test
# suite once per lane (STREAMALLOC_DRIVER_LANE=lock, delegate, delegate_always: the
# allocator's default lane for CUDA is taken from it) -> <card>-lanes-tests-<lane>.log.
# About 3-4 minutes with the defaults; tune with ITERS (per thread, driver variants;
# null variants run NULL_ITERS), REPS, MAXT, ANCHOR_ITERS. Set ANCHORS= (empty) to skip
# the PyTorch anchor.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
BIN=${BIN:-.gpu/streamalloc-bench}
[ -x "$BIN" ] || BIN=.gpu/bin/streamalloc-bench
ANCHORS=${ANCHORS-.gpu/anchors}
ITERS=${ITERS:-40000}
NULL_ITERS=${NULL_ITERS:-2000000}
REPS=${REPS:-3}
MAXT=${MAXT:-16}
ANCHOR_ITERS=${ANCHOR_ITERS:-$ITERS}
VARIANTS=${VARIANTS:-raw_driver,raw_one_thread,raw_lock,raw_delegate,seed_replica,streamalloc,streamalloc_nolane,streamalloc_lock,streamalloc_delegate,streamalloc_delegate_always,seed_replica_null,streamalloc_null}
mkdir -p "$OUT"

NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | sed 's/^ *//; s/ *$//')
LOWER=$(echo "$NAME" | tr '[:upper:]' '[:lower:]')
case "$LOWER" in
  *h200*) CARD=h200 ;;
  *h100*) CARD=h100 ;;
  *) CARD=$(echo "$LOWER" | sed 's/^nvidia //' | awk '{print $1}' | tr -cd 'a-z0-9_-') ;;
esac
CARD=${CARD:-gpu}
CSV="$OUT/$CARD-lanes.csv"
echo "card: $NAME ($CARD); $(nproc) CPU cores; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)"
echo "binary: $BIN ($(sha256sum "$BIN" | cut -c1-16))"

START=$SECONDS
"$BIN" --max-threads "$MAXT" --reps "$REPS" --iters "$ITERS" --null-iters "$NULL_ITERS" \
  --variants "$VARIANTS" --blocks 0 --gpu-name "$NAME" --csv "$CSV" 2>&1 \
  | tee "$OUT/$CARD-lanes-bench.log"
echo "streamalloc-bench: $((SECONDS - START)) s"

if [ -n "$ANCHORS" ]; then
  START=$SECONDS
  if bash "$ANCHORS/run_torch_anchor.sh" "$ANCHOR_ITERS" "$MAXT" >"$OUT/$CARD-lanes-anchor.log" 2>&1; then
    grep -E '^torch_[^,]*,[0-9]+,' "$OUT/$CARD-lanes-anchor.log" | sed "s|^|$NAME,|" >>"$CSV"
  else
    echo "PyTorch anchor FAILED (see $CARD-lanes-anchor.log):"
    tail -n 20 "$OUT/$CARD-lanes-anchor.log"
  fi
  echo "PyTorch anchor: $((SECONDS - START)) s"
fi

TESTS_BIN=${TESTS_BIN:-.gpu/bin/gpu-tests}
TEST_LANES=${TEST_LANES:-lock delegate delegate_always}
TEST_SUMMARY=""
if [ -x "$TESTS_BIN" ]; then
  for lane in $TEST_LANES; do
    LOG="$OUT/$CARD-lanes-tests-$lane.log"
    STREAMALLOC_DRIVER_LANE=$lane STREAMALLOC_GPU_REQUIRED=1 timeout 420 "$TESTS_BIN" \
      --test-threads=1 --nocapture >"$LOG" 2>&1
    rc=$?
    TEST_SUMMARY="$TEST_SUMMARY
  gpu tests, lane $lane: rc $rc: $(grep -E '^test result' "$LOG" | tail -n1)"
  done
else
  TEST_SUMMARY="
  gpu tests: skipped ($TESTS_BIN not carried)"
fi

"$BIN" --plot-only "$CSV" --png "$OUT/$CARD-lanes.png" --gpu-name "$NAME"

# The table, then the issue's goals against this run.
echo
echo "M alloc+free pairs/s, aggregate, $NAME (ours: median of $REPS; raw_one_thread: threads = streams)"
awk -F, 'NR > 1 && $3 > 0 {
    if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 }
    if (!($3 in tseen)) { tseen[$3] = 1; ts[++m] = $3 }
    v[$2, $3] = $4
  }
  END {
    printf "%-30s", "variant \\ threads"; for (j = 1; j <= m; j++) printf "%9s", ts[j]; printf "\n"
    for (i = 1; i <= n; i++) {
      printf "%-30s", order[i]
      for (j = 1; j <= m; j++) { x = v[order[i], ts[j]]; printf "%9s", (x == "" ? "-" : sprintf("%.3f", x)) }
      printf "\n"
    }
  }' "$CSV"
echo
awk -F, -v maxt="$MAXT" 'NR > 1 { v[$2, $3] = $4 }
  function r(a, b) { return (b > 0 && a != "") ? sprintf("%.2fx", a / b) : "n/a" }
  END {
    split("streamalloc streamalloc_lock streamalloc_delegate streamalloc_delegate_always streamalloc_nolane", lanes, " ")
    printf "goals (issue 14), %d threads unless said:\n", maxt
    for (i = 1; i in lanes; i++) {
      s = lanes[i]
      printf "  %-28s vs torch_cudaMallocAsync %s (goal 2x), vs seed_replica %s (goal 1.5x); 1 thread vs raw_driver %s (goal 0.95x)\n", \
        s, r(v[s, maxt], v["torch_cudaMallocAsync", maxt]), r(v[s, maxt], v["seed_replica", maxt]), r(v[s, 1], v["raw_driver", 1])
    }
    printf "  streamalloc_null 1 thread vs seed_replica_null %s (goal 1x); %d threads %s M (goal 50)\n", \
      r(v["streamalloc_null", 1], v["seed_replica_null", 1]), maxt, v["streamalloc_null", maxt]
    printf "  the driver alone from one thread: %s M pairs/s on 1 stream, %s on %d streams\n", \
      v["raw_one_thread", 1], v["raw_one_thread", maxt], maxt
  }' "$CSV"
echo "$TEST_SUMMARY"
