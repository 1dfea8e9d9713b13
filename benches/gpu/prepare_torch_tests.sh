#!/usr/bin/env bash
# Build machine: builds libstreamalloc.so (release, stripped) and copies what the
# GPU host's torch tests need into .gpu/ (git-ignored; carry it to the GPU host).
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --lib
mkdir -p .gpu
cp "$TARGET/release/libstreamalloc.so" .gpu/
strip .gpu/libstreamalloc.so || true
cp src/capi/python/streamalloc_torch.py src/capi/python/test_torch.py \
   src/capi/torch_shim.cpp src/capi/streamalloc.h .gpu/
cp benches/gpu/torch_tests.sh .gpu/
ls -la .gpu
