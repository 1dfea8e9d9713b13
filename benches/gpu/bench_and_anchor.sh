#!/bin/bash
# Run ON the GPU host, from the repo root, with the carried folder .gpu/ made by
# benches/gpu/prepare.sh. Writes under $OUT:
#   <card>.csv        gpu,variant,threads,mpairs_per_s: our variants (medians), the heap
#                     bytes per live block (threads = 0), then PyTorch's anchor rows
#   <card>.png        throughput against threads, every variant and both anchors
#   <card>-bench.log, <card>-anchor.log
# <card> is h100 or h200 (else a short name from nvidia-smi). About 4-5 minutes with the
# defaults; tune with ITERS (per thread, driver variants; null variants run 10x), REPS,
# MAXT, ANCHOR_ITERS.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
BIN=${BIN:-.gpu/streamalloc-bench}
ANCHORS=${ANCHORS:-.gpu/anchors}
ITERS=${ITERS:-40000}
REPS=${REPS:-3}
MAXT=${MAXT:-16}
ANCHOR_ITERS=${ANCHOR_ITERS:-$ITERS}
mkdir -p "$OUT"

NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | sed 's/^ *//; s/ *$//')
LOWER=$(echo "$NAME" | tr '[:upper:]' '[:lower:]')
case "$LOWER" in
  *h200*) CARD=h200 ;;
  *h100*) CARD=h100 ;;
  *) CARD=$(echo "$LOWER" | sed 's/^nvidia //' | awk '{print $1}' | tr -cd 'a-z0-9_-') ;;
esac
CARD=${CARD:-gpu}
CSV="$OUT/$CARD.csv"
echo "card: $NAME ($CARD); $(nproc) CPU cores; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)"

START=$SECONDS
"$BIN" --max-threads "$MAXT" --reps "$REPS" --iters "$ITERS" --gpu-name "$NAME" \
  --csv "$CSV" 2>&1 | tee "$OUT/$CARD-bench.log"
echo "streamalloc-bench: $((SECONDS - START)) s"

START=$SECONDS
if bash "$ANCHORS/run_torch_anchor.sh" "$ANCHOR_ITERS" "$MAXT" >"$OUT/$CARD-anchor.log" 2>&1; then
  # Anchor rows are variant,threads,mpairs_per_s: prefix the gpu column.
  grep -E '^torch_[^,]*,[0-9]+,' "$OUT/$CARD-anchor.log" | sed "s|^|$NAME,|" >>"$CSV"
else
  echo "PyTorch anchor FAILED (see $CARD-anchor.log):"
  tail -n 20 "$OUT/$CARD-anchor.log"
fi
echo "PyTorch anchor: $((SECONDS - START)) s"

"$BIN" --plot-only "$CSV" --png "$OUT/$CARD.png" --gpu-name "$NAME"

# The combined table last: threads x variants, M pairs/s.
echo
echo "M alloc+free pairs/s, aggregate, $NAME (ours: median of $REPS)"
awk -F, 'NR > 1 && $3 > 0 && $2 !~ /^reserved_/ {
    if (!($2 in seen)) { seen[$2] = 1; order[++n] = $2 }
    if (!($3 in tseen)) { tseen[$3] = 1; ts[++m] = $3 }
    v[$2, $3] = $4
  }
  NR > 1 && ($3 == 0 || $2 ~ /^reserved_/) { extra = extra sprintf("%s (threads %s): %s\n", $2, $3, $4) }
  END {
    printf "%-34s", "variant \\ threads"; for (j = 1; j <= m; j++) printf "%9s", ts[j]; printf "\n"
    for (i = 1; i <= n; i++) {
      printf "%-34s", order[i]
      for (j = 1; j <= m; j++) { x = v[order[i], ts[j]]; printf "%9s", (x == "" ? "-" : sprintf("%.3f", x)) }
      printf "\n"
    }
    printf "%s", extra
  }' "$CSV"
