#!/usr/bin/env bash
# Runs ON an H100 host (the H200 hosts refuse compute-sanitizer), from the repo root, with
# the carried .gpu/ folder made by benches/gpu/build.sh: every GPU test (tests/gpu.rs,
# .gpu/bin/gpu-tests) under compute-sanitizer, one test per process, with
#   memcheck   --tool memcheck --leak-check full
#   synccheck  --tool synccheck
# Logs: $OUT/sanitizer/<tool>/<test>.log (or ./gpu-out/... when $OUT is unset), and a
# summary table in $OUT/sanitizer/summary.txt, printed last, naming the card.
#
# Intended driver errors. Some tests provoke errors on purpose (a request larger than the
# card makes cuMemAllocAsync return CUDA_ERROR_OUT_OF_MEMORY, misuse probes make calls
# fail); compute-sanitizer counts such "Program hit CUDA_ERROR_... on CUDA API call"
# reports as errors. Tests listed in API_ERRORS_EXPECTED are therefore run twice per
# tool: once as is (log <test>.log, kept to show which API errors occurred), and once
# with --report-api-errors no (log <test>.no-api-errors.log), which must read
# "ERROR SUMMARY: 0 errors": memory errors and leaks are still reported there, only the
# intended API errors are not. Every other test must read 0 errors as is.
#
# Exit status: nonzero when any required log lacks "ERROR SUMMARY: 0 errors" or its test
# failed.
#
# Env: GPU_DIR (default .gpu), SANITIZER (path of compute-sanitizer; default: PATH, then
#      /usr/local/cuda*/bin), TESTS (space-separated test names; default: all but the
#      skip report), TOOLS (default "memcheck synccheck"), SAN_TIMEOUT (s per process,
#      default 300), API_ERRORS_EXPECTED (default below).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-./gpu-out}
DIR=$OUT/sanitizer
mkdir -p "$DIR"
BIN=$GPU_DIR/bin/gpu-tests
TOOLS=${TOOLS:-memcheck synccheck}
SAN_TIMEOUT=${SAN_TIMEOUT:-300}
# Tests that provoke CUDA API errors on purpose (see above).
API_ERRORS_EXPECTED=${API_ERRORS_EXPECTED:-gpu_larger_than_card_oom gpu_memory_fraction_oom gpu_bad_input gpu_seed_replica_parity gpu_capture_region}

if [ ! -x "$BIN" ]; then
    echo "error: $BIN missing: run benches/gpu/build.sh on the build machine and carry .gpu" >&2
    exit 2
fi
SAN=${SANITIZER:-$(command -v compute-sanitizer || true)}
if [ -z "$SAN" ]; then
    SAN=$(ls -d /usr/local/cuda*/bin/compute-sanitizer /opt/cuda*/bin/compute-sanitizer \
        2>/dev/null | sort -V | tail -1)
fi
if [ -z "$SAN" ] || [ ! -x "$SAN" ]; then
    echo "error: compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)" >&2
    exit 2
fi

if ! "$SAN" --help 2>&1 | grep -q -- '--report-api-errors'; then
    echo "error: $SAN has no --report-api-errors option (too old): the intended API errors" \
        "cannot be told apart; use a newer CUDA toolkit's compute-sanitizer" >&2
    exit 2
fi

CARD=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)
{
    echo "card: $CARD"
    echo "sanitizer: $SAN ($("$SAN" --version 2>&1 | grep -i version | head -1))"
    [ -f "$GPU_DIR/MANIFEST" ] && head -2 "$GPU_DIR/MANIFEST"
} | tee "$DIR/header.txt"

if [ -z "${TESTS:-}" ]; then
    TESTS=$("$BIN" --list 2>/dev/null | sed -n 's/: test$//p' | grep -v '^gpu_tests_report_skip$')
fi

expected() { [[ " $API_ERRORS_EXPECTED " == *" $1 "* ]]; }

ROWS=()
FAILED=0

# run TOOL TEST LOG [extra sanitizer options...] -> sets RC, SUMMARY_LINE
run() {
    local tool=$1 test=$2 log=$3
    shift 3
    local opts=(--tool "$tool")
    [ "$tool" = memcheck ] && opts+=(--leak-check full)
    {
        echo "# card: $CARD"
        echo "# $SAN ${opts[*]} $* $BIN --exact $test --test-threads=1 --nocapture"
    } >"$log"
    STREAMALLOC_GPU_REQUIRED=1 STREAMALLOC_GPU_BAD_STREAM=1 RUST_BACKTRACE=1 \
        timeout "$SAN_TIMEOUT" "$SAN" "${opts[@]}" "$@" \
        "$BIN" --exact "$test" --test-threads=1 --nocapture >>"$log" 2>&1
    RC=$?
    SUMMARY_LINE=$(grep -E 'ERROR SUMMARY:' "$log" | tail -1)
    [ -n "$SUMMARY_LINE" ] || SUMMARY_LINE="(no ERROR SUMMARY line)"
}

clean() { # LOG: the summary reads 0 errors and the test passed
    grep -q 'ERROR SUMMARY: 0 errors' "$1" && grep -q '^test result: ok. 1 passed' "$1"
}

for tool in $TOOLS; do
    mkdir -p "$DIR/$tool"
    for test in $TESTS; do
        log=$DIR/$tool/$test.log
        echo "== $tool $test"
        run "$tool" "$test" "$log"
        api=$(grep -c 'Program hit' "$log")
        if expected "$test"; then
            first="rc=$RC $SUMMARY_LINE ($api API error reports, intended)"
            log2=$DIR/$tool/$test.no-api-errors.log
            run "$tool" "$test" "$log2" --report-api-errors no
            if clean "$log2"; then verdict=ok; else verdict=FAILED; FAILED=1; fi
            ROWS+=("$(printf '%-9s %-36s %-6s %s | without API errors: rc=%s %s' \
                "$tool" "$test" "$verdict" "$first" "$RC" "$SUMMARY_LINE")")
        else
            if clean "$log"; then verdict=ok; else verdict=FAILED; FAILED=1; fi
            ROWS+=("$(printf '%-9s %-36s %-6s rc=%s %s (%s API error reports)' \
                "$tool" "$test" "$verdict" "$RC" "$SUMMARY_LINE" "$api")")
        fi
        echo "   ${ROWS[-1]}"
    done
done

{
    cat "$DIR/header.txt"
    echo
    printf '%s\n' "${ROWS[@]}"
    echo
    if [ "$FAILED" -eq 0 ]; then
        echo "ALL CLEAN: every required log reads 'ERROR SUMMARY: 0 errors' and its test passed"
    else
        echo "NOT CLEAN: see the FAILED rows' logs under $DIR"
    fi
} | tee "$DIR/summary.txt"
exit "$FAILED"
