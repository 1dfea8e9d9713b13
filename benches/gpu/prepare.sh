#!/bin/bash
# Build here (no GPU needed) and fill the carried folder .gpu/ for bench_and_anchor.sh:
#   .gpu/streamalloc-bench   the stripped release benchmark binary
#   .gpu/anchors/            the PyTorch anchor (copied from ../shared/anchors)
# Usage, from the repo root: bash benches/gpu/prepare.sh [SHARED_DIR]
set -euo pipefail
SHARED=${1:-../shared}
cargo build --release --bin streamalloc-bench
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p .gpu/anchors
install -m 0755 "$TARGET/release/streamalloc-bench" .gpu/streamalloc-bench
install -m 0644 "$SHARED/anchors/torch_bench.cpp" "$SHARED/anchors/run_torch_anchor.sh" .gpu/anchors/
du -sh .gpu
