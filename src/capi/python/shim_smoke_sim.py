"""The PyTorch shim on the simulated device, without a GPU: builds the shim against the
installed torch, installs it, and checks PyTorch's own statistics bindings
(torch._C._cuda_memoryStats / _cuda_resetPeakMemoryStats /
_cuda_resetAccumulatedMemoryStats, what torch.cuda.memory_stats() and friends call)
against allocations made through the library.

    STREAMALLOC_BACKEND=sim STREAMALLOC_LIB=target/debug/libstreamalloc.so \\
        CUDA_HOME=<cuda headers> python3 src/capi/python/shim_smoke_sim.py

Prints "shim smoke test on the simulated device: ok" or raises.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import streamalloc_torch as s  # noqa: E402
import torch  # noqa: E402

MiB = 1 << 20
assert os.environ.get("STREAMALLOC_BACKEND") == "sim", "set STREAMALLOC_BACKEND=sim"
assert s.install() == "shim"
lib = s._require()
a = lib.streamalloc_alloc(3 * MiB, 0, None)
b = lib.streamalloc_alloc(5 * MiB, 0, None)
st = torch._C._cuda_memoryStats(0)
alloc = st["allocated_bytes"]["all"]
assert alloc["current"] == 8 * MiB and alloc["peak"] == 8 * MiB, alloc
assert st["requested_bytes"]["all"]["current"] == 8 * MiB, st["requested_bytes"]
assert st["allocation"]["all"]["current"] == 2, st["allocation"]
assert st["reserved_bytes"]["all"]["current"] >= 8 * MiB, st["reserved_bytes"]
assert st["active_bytes"]["all"]["current"] >= 8 * MiB, st["active_bytes"]
lib.streamalloc_free(b, 0, 0, None)
torch._C._cuda_resetPeakMemoryStats(0)
st = torch._C._cuda_memoryStats(0)
assert st["allocated_bytes"]["all"]["peak"] == 3 * MiB, st["allocated_bytes"]
assert st["allocated_bytes"]["all"]["freed"] == 5 * MiB, st["allocated_bytes"]
assert lib.streamalloc_alloc(1 << 40, 0, None) is None
assert torch._C._cuda_memoryStats(0)["num_ooms"] == 1
torch._C._cuda_resetAccumulatedMemoryStats(0)
st = torch._C._cuda_memoryStats(0)
assert st["num_ooms"] == 0 and st["allocated_bytes"]["all"]["freed"] == 0, st
lib.streamalloc_free(a, 0, 0, None)
assert torch._C._cuda_memoryStats(0)["allocated_bytes"]["all"]["current"] == 0
print("shim smoke test on the simulated device: ok")
