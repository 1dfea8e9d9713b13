#!/usr/bin/env bash
# A fuzzing campaign on a many-core host (the GPU host's CPUs: the targets run on the
# simulated device, no GPU is used). One script, two steps:
#
#   benches/gpu/fuzz_campaign.sh prepare   # build machine: fills .gpu-fuzz/ (git-ignored)
#   benches/gpu/fuzz_campaign.sh run       # many-core host, repo root, .gpu-fuzz/ carried
#
# prepare builds the three cargo-fuzz targets (ops, faults, c_abi) as `cargo fuzz build
# -O -a` does (optimized, debug assertions on, AddressSanitizer), strips them (the
# sanitizer runtime is linked in) and copies them with the committed corpora.
# run starts WORKERS libFuzzer processes (default: one per core) split over the targets
# in the ratio of TARGETS (default ops:1,faults:1,c_abi:1), SECS seconds each (default
# 540); the workers of one target share a scratch copy of its corpus (libFuzzer reloads
# it every second). It writes under $OUT: fuzz-<target>-<n>.log of each worker,
# artifacts/ (any crash, leak or timeout input), corpus-new-<target>.tgz (units found),
# and fuzz-campaign.csv / the summary: per target, workers, CPU-seconds, executions,
# crashes. Exit status 1 if any worker found a crash.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DIR=${FUZZ_DIR:-$ROOT/.gpu-fuzz}
ALL_TARGETS=(ops faults c_abi)

prepare() {
  set -e
  rm -rf "$DIR" && mkdir -p "$DIR/bin" "$DIR/corpus"
  EXCLUDE=$(git rev-parse --git-path info/exclude)
  git check-ignore -q .gpu-fuzz || echo '/.gpu-fuzz/' >>"$EXCLUDE"
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -O -a)
  for t in "${ALL_TARGETS[@]}"; do
    cp "fuzz/target/x86_64-unknown-linux-gnu/release/$t" "$DIR/bin/$t"
    strip "$DIR/bin/$t"
    cp -r "fuzz/corpus/$t" "$DIR/corpus/$t"
  done
  echo "head $(git rev-parse HEAD)$(git diff --quiet HEAD -- src fuzz || echo ' (dirty)')" >"$DIR/MANIFEST"
  du -sh "$DIR"; cat "$DIR/MANIFEST"
}

run() {
  OUT=${OUT:-$ROOT/out}
  SECS=${SECS:-540}
  WORKERS=${WORKERS:-$(nproc)}
  TARGETS=${TARGETS:-ops:1,faults:1,c_abi:1}
  mkdir -p "$OUT/artifacts"
  WORK=$(mktemp -d)
  echo "host: $(nproc) CPU cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" \
    | tee "$OUT/fuzz-env.txt"
  tee -a "$OUT/fuzz-env.txt" <"$DIR/MANIFEST"
  echo "workers $WORKERS, $SECS s each, targets $TARGETS" | tee -a "$OUT/fuzz-env.txt"
  # Workers per target, in the ratio given.
  declare -A share
  total_w=0
  IFS=, read -ra parts <<<"$TARGETS"
  for p in "${parts[@]}"; do total_w=$((total_w + ${p#*:})); done
  assigned=0
  for i in "${!parts[@]}"; do
    t=${parts[$i]%%:*}; w=${parts[$i]#*:}
    if [ "$i" -eq $((${#parts[@]} - 1)) ]; then n=$((WORKERS - assigned)); else n=$((WORKERS * w / total_w)); fi
    share[$t]=$n; assigned=$((assigned + n))
    cp -r "$DIR/corpus/$t" "$WORK/corpus-$t"
    find "$WORK/corpus-$t" -type f | sort >"$WORK/seed-$t.list"
  done
  pids=()
  for t in "${!share[@]}"; do
    for n in $(seq 1 "${share[$t]}"); do
      "$DIR/bin/$t" "$WORK/corpus-$t" -max_total_time="$SECS" -print_final_stats=1 \
        -rss_limit_mb=4096 -timeout=60 -artifact_prefix="$OUT/artifacts/$t-" \
        >"$OUT/fuzz-$t-$n.log" 2>&1 &
      pids+=($!)
    done
  done
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  echo "target,workers,cpu_seconds,executions,crashes" >"$OUT/fuzz-campaign.csv"
  for t in "${!share[@]}"; do
    execs=$(cat "$OUT"/fuzz-"$t"-*.log | awk '/stat::number_of_executed_units/ { s += $2 } END { print s + 0 }')
    crashes=$(ls "$OUT/artifacts" 2>/dev/null | grep -c "^$t-" || true)
    echo "$t,${share[$t]},$((share[$t] * SECS)),$execs,$crashes" >>"$OUT/fuzz-campaign.csv"
    find "$WORK/corpus-$t" -type f | sort | comm -13 "$WORK/seed-$t.list" - \
      | tar -czf "$OUT/corpus-new-$t.tgz" -T - 2>/dev/null
  done
  rm -rf "$WORK"
  echo "== fuzz campaign: $WORKERS workers x $SECS s"
  tr , "\t" <"$OUT/fuzz-campaign.csv"
  ls "$OUT/artifacts" | head
  return $failed
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
