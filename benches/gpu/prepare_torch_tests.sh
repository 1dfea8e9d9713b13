#!/usr/bin/env bash
# Build machine: builds libstreamalloc.so (release, stripped), the streamalloc_torch wheel
# around it (what `pip install .` gives a PyTorch user), and copies what the GPU host's
# torch tests and torch benchmark need into .gpu/ (git-ignored; carry it to the GPU host):
#   .gpu/libstreamalloc.so, .gpu/wheel/streamalloc_torch-*.whl,
#   .gpu/tests/test_torch.py (without the module: the tests import the installed wheel).
# Then, on the GPU host: benches/gpu/torch_tests.sh (one GPU), torch_tests_2gpu.sh (two),
# torch_alloc_bench.sh (speed).
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --lib
rm -rf .gpu/wheel .gpu/tests .gpu/shim_cache build ./*.egg-info src/*.egg-info  # stale build/ would enter the wheel
mkdir -p .gpu/wheel .gpu/tests
if ! git check-ignore -q .gpu; then echo '/.gpu/' >>"$(git rev-parse --git-path info/exclude)"; fi
cp "$TARGET/release/libstreamalloc.so" .gpu/
strip .gpu/libstreamalloc.so || true
# The wheel, around the library just built (no second cargo build).
STREAMALLOC_PREBUILT_LIB=$PWD/.gpu/libstreamalloc.so \
  python3 -m pip wheel --no-deps -w .gpu/wheel . >.gpu/wheel/build.log 2>&1 \
  || { echo "wheel build FAILED:"; tail -20 .gpu/wheel/build.log; exit 1; }
rm -rf build ./*.egg-info src/*.egg-info
cp src/capi/python/test_torch.py .gpu/tests/
ls -la .gpu .gpu/wheel
