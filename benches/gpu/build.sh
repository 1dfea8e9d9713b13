#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything a GPU run needs, into .gpu/ at the repo
# root (git-ignored), small enough to travel (64 MiB at most):
#   .gpu/bin/gpu-tests          the `gpu` integration-test binary (tests/gpu.rs), release
#   .gpu/bin/streamalloc-bench  the benchmark binary, when it exists      [bench: see below]
#   .gpu/bin/streamalloc-dataloader  the data-loader benchmark (benches/gpu/dataloader.sh)
#   .gpu/bin/cudarc_kernel      the example launching a kernel on a pooled block
#   .gpu/lib/libstreamalloc.so  the C ABI library, when it exists         [capi:  see below]
#   .gpu/anchors/*              the PyTorch anchor (../shared/anchors)
#   .gpu/MANIFEST               commit, build time, sizes and sha256 of the above
# Then, on the GPU host, from the repo root: benches/gpu/run_on_gpu.sh
#
# Env: CARGO_TARGET_DIR (default <repo>/target), SHARED (default <repo>/../shared).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SHARED=${SHARED:-$ROOT/../shared}
DEST=$ROOT/.gpu
STRIP=${STRIP:-strip}

rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/lib" "$DEST/anchors"
# .gpu/ must never be committed (it is also in .gitignore).
EXCLUDE=$(git rev-parse --git-path info/exclude)
if ! git check-ignore -q .gpu; then
    mkdir -p "$(dirname "$EXCLUDE")" && echo '/.gpu/' >>"$EXCLUDE"
fi

copy_stripped() { # SRC DST
    cp "$1" "$2"
    "$STRIP" --strip-unneeded "$2" 2>/dev/null || "$STRIP" "$2"
    echo "  $(basename "$2"): $(du -h "$2" | cut -f1)"
}

# Which optional targets does the manifest declare? (bench binary, C ABI cdylib)
read -r HAS_BENCH HAS_CDYLIB < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
pkgs = json.load(sys.stdin)["packages"]
targets = [t for p in pkgs for t in p["targets"]]
bench = any(t["name"] == "streamalloc-bench" and "bin" in t["kind"] for t in targets)
cdylib = any("cdylib" in t["crate_types"] for t in targets)
print(int(bench), int(cdylib))')

echo "== building the gpu test binary (release)"
EXE=$(cargo test --release -p streamalloc --features cuda-13000 --test gpu --no-run \
    --message-format=json \
    | python3 -c '
import json, sys
exes = []
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu" \
            and m.get("executable"):
        exes.append(m["executable"])
if not exes:
    sys.exit("no executable for the gpu test target in cargo output")
print(exes[-1])')
copy_stripped "$EXE" "$DEST/bin/gpu-tests"

# ---------------------------------------------------------------------------------------
# [bench] streamalloc-bench: built by the bench branch. Built here when the manifest
# declares it; copied when it exists in <target>/release.
# ---------------------------------------------------------------------------------------
if [ "$HAS_BENCH" = 1 ]; then
    echo "== building streamalloc-bench and streamalloc-dataloader (release)"
    cargo build --release -p streamalloc-bench
fi
for bin in streamalloc-bench streamalloc-dataloader; do
    if [ -x "$CARGO_TARGET_DIR/release/$bin" ]; then
        copy_stripped "$CARGO_TARGET_DIR/release/$bin" "$DEST/bin/$bin"
    else
        echo "  $bin: not built (no such binary yet), its step will be skipped"
    fi
done

# The example that launches a kernel through cudarc on a pooled block (GPU only).
echo "== building the cudarc_kernel example (release)"
cargo build --release -p streamalloc --features cuda-13000 --example cudarc_kernel
copy_stripped "$CARGO_TARGET_DIR/release/examples/cudarc_kernel" "$DEST/bin/cudarc_kernel"

# ---------------------------------------------------------------------------------------
# [capi] libstreamalloc.so: the C ABI library (PyTorch's CUDAPluggableAllocator), built
# by the capi branch. Built here when the manifest declares a cdylib; copied if present.
# Put its Python/PyTorch driver scripts under benches/gpu/ (they travel with the tree).
# ---------------------------------------------------------------------------------------
if [ "$HAS_CDYLIB" = 1 ]; then
    echo "== building the C ABI library (release; the capi/ member, feature capi)"
    cargo build --release -p streamalloc-capi
fi
SO=$CARGO_TARGET_DIR/release/libstreamalloc.so
if [ -f "$SO" ]; then
    copy_stripped "$SO" "$DEST/lib/libstreamalloc.so"
else
    echo "  libstreamalloc.so: not built (no cdylib yet), pluggable-allocator step will be skipped"
fi

echo "== PyTorch anchor from $SHARED/anchors"
if compgen -G "$SHARED/anchors/*" >/dev/null; then
    cp -r "$SHARED"/anchors/* "$DEST/anchors/"
    ls "$DEST/anchors" | sed 's/^/  /'
else
    echo "  none found: torch step will be skipped"
fi

{
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!.gpu' || echo ' (dirty)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm), $(rustc --version)"
    (cd "$DEST" && find . -type f ! -name MANIFEST | sort | xargs sha256sum)
} >"$DEST/MANIFEST"

TOTAL=$(du -sb "$DEST" | cut -f1)
echo "== .gpu/ holds $((TOTAL / 1024)) KiB"
if [ "$TOTAL" -gt $((60 * 1024 * 1024)) ]; then
    echo "error: .gpu/ is over 60 MiB; it must travel in 64 MiB with the tree" >&2
    exit 1
fi
echo "carry .gpu and run on the GPU host: benches/gpu/run_on_gpu.sh"
