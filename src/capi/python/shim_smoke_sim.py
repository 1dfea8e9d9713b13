"""The PyTorch shim on the simulated device, without a GPU: builds the shim against the
installed torch, installs it, and checks, through PyTorch's own bindings where they do
not need a CUDA driver:

  * statistics: torch._C._cuda_memoryStats / _cuda_resetPeakMemoryStats /
    _cuda_resetAccumulatedMemoryStats (what torch.cuda.memory_stats() and friends call)
    against allocations made through the library;
  * history and snapshots: torch.cuda.memory._snapshot() (c10's snapshot turned into
    PyTorch's dict, frames symbolized by PyTorch) after allocations and frees through
    the shim's own paths with history recorded, for each context level (all, alloc,
    state, none) and skip_actions; the pickle read back by torch.cuda._memory_viz;
  * OOM observers: called with (device, requested, total, free) by a refused
    allocation, which raises torch.OutOfMemoryError; an observer's exception is
    rethrown from the allocation, and the allocator works afterwards;
  * private pools (torch.cuda.MemPool, use_mem_pool, graph trees' checkpoints): the
    shim's overrides createOrIncrefPool, getPoolUseCount, beginAllocateToPool (a
    use_mem_pool thread filter), endAllocateToPool, releasePool,
    checkPoolLiveAllocations, getCheckpointState / setCheckpointPoolState, through the
    same c10 calls PyTorch makes, and PyTorch's own bindings where they need no CUDA
    (torch._C._cuda_beginAllocateToPool, _cuda_endAllocateToPool, _cuda_releasePool,
    _cuda_checkPoolLiveAllocations, _cuda_getCheckpointState).

PyTorch's bindings for recordHistory and OOM observers initialize CUDA first, so the
shim's `_test_*` entry points do their work here (same c10 calls, same arguments).

    STREAMALLOC_BACKEND=sim STREAMALLOC_LIB=target/debug/libstreamalloc.so \\
        CUDA_HOME=<cuda headers> python3 src/capi/python/shim_smoke_sim.py

CUDA_HOME needs include/ with the runtime headers (crt/host_config.h among them) and
lib64/libcudart.so; without a toolkit, a pip-installed torch has them: include/ from
site-packages/triton/backends/nvidia/include, libcudart.so linked to
site-packages/nvidia/cu13/lib/libcudart.so.13.

Prints "shim smoke test on the simulated device: ok" or raises.
"""

import os
import pickle
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import streamalloc_torch as s  # noqa: E402
import torch  # noqa: E402

MiB = 1 << 20
THIS = os.path.abspath(__file__)
assert os.environ.get("STREAMALLOC_BACKEND") == "sim", "set STREAMALLOC_BACKEND=sim"
assert s.install() == "shim"
lib = s._require()
shim = s._shim


def check_stats():
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


def here(frames):
    """Whether frames (a snapshot's) include this file."""
    return any(f["filename"] == THIS for f in frames or [])


def scripted(context, stream=0):
    """Records history at a context level around a scripted sequence; returns the
    snapshot taken while the second block is live, its addresses, and the sequence."""
    shim._test_record_history("all", context, "python", 1000, True)
    assert torch._C._cuda_isHistoryEnabled()
    pa = shim._test_alloc(MiB + 3, 0, stream)
    pb = shim._test_alloc(3 * MiB, 0, stream)
    shim._test_free(pa)
    pc = shim._test_alloc(MiB + 3, 0, stream)
    shim._test_free(pc)
    snap = torch.cuda.memory._snapshot()
    shim._test_free(pb)
    shim._test_record_history(None)
    assert not torch._C._cuda_isHistoryEnabled()
    want = [("alloc", pa, MiB + 3), ("alloc", pb, 3 * MiB),
            ("free_requested", pa, MiB + 3), ("free_completed", pa, MiB + 3),
            ("alloc", pc, MiB + 3),
            ("free_requested", pc, MiB + 3), ("free_completed", pc, MiB + 3)]
    return snap, (pa, pb, pc), want


def mine(snap, ptrs):
    return [e for e in snap["device_traces"][0] if e.get("addr") in ptrs
            and e["action"] in ("alloc", "free_requested", "free_completed")]


def live_block(snap, ptr):
    for seg in snap["segments"]:
        addr = seg["address"]
        for b in seg["blocks"]:
            if addr == ptr:
                return seg, b
            addr += b["size"]
    return None, None


def check_history_and_snapshot():
    assert not torch._C._cuda_isHistoryEnabled()
    stream = 0  # the legacy default stream (the simulated device knows no other here)
    # context "all": frames on the live block, on allocations and on frees.
    snap, (pa, pb, pc), want = scripted("all", stream)
    got = [(e["action"], e["addr"], e["size"]) for e in mine(snap, {pa, pb, pc})]
    assert got == want, (got, want)
    assert all(here(e.get("frames")) for e in mine(snap, {pa, pb, pc})), mine(snap, {pa, pb, pc})
    assert all(e["stream"] == stream and e.get("time_us", 0) > 0 for e in mine(snap, {pa, pb, pc}))
    seg, blk = live_block(snap, pb)
    assert blk is not None, snap["segments"]
    assert blk["state"] == "active_allocated" and blk["requested_size"] == 3 * MiB, blk
    assert blk["size"] >= 3 * MiB and seg["total_size"] == blk["size"], (seg, blk)
    assert seg["stream"] == stream and seg["segment_type"] == "large", seg
    assert tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0), seg
    assert here(blk.get("frames")), blk.get("frames")
    assert snap["allocator_settings"]["PYTORCH_CUDA_ALLOC_CONF"] == "streamalloc"
    for p in (pa, pc):  # freed: cached (inactive, no frames) or gone
        _, b = live_block(snap, p)
        assert b is None or (b["state"] == "inactive" and not b.get("frames")), b

    # memory_viz reads it as it reads the native allocator's pickle.
    from torch.cuda import _memory_viz as viz
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "snap.pickle")
        with open(path, "wb") as f:
            pickle.dump(snap, f)
        with open(path, "rb") as f:
            back = pickle.load(f)
    lines = viz.segments(back, format_flamegraph=lambda text: text)
    sizes = {int(ln.rsplit(" ", 1)[1]) for ln in lines.splitlines() if ";active_allocated;" in ln}
    assert 3 * MiB in sizes, lines[:2000]
    viz.segsum(back)
    assert viz.trace(back)
    viz.trace_plot(back)
    viz.segment_plot(back)

    # "alloc": frames on allocations, none on frees.
    snap, ptrs, want = scripted("alloc")
    entries = mine(snap, set(ptrs))
    assert [(e["action"], e["addr"], e["size"]) for e in entries] == want
    assert all(here(e.get("frames")) == (e["action"] == "alloc") for e in entries), entries
    assert here(live_block(snap, ptrs[1])[1].get("frames"))

    # "state": frames on the live block only.
    snap, ptrs, want = scripted("state")
    entries = mine(snap, set(ptrs))
    assert [(e["action"], e["addr"], e["size"]) for e in entries] == want
    assert all(not e.get("frames") for e in entries), entries
    assert here(live_block(snap, ptrs[1])[1].get("frames"))

    # No context: the library's entries without frames (the shim's path stays plain).
    snap, ptrs, want = scripted(None)
    entries = mine(snap, set(ptrs))
    assert [(e["action"], e["addr"], e["size"]) for e in entries] == want
    assert all(not e.get("frames") for e in entries), entries
    assert not live_block(snap, ptrs[1])[1].get("frames")

    # skip_actions, and a ring of max_entries (the newest kept, with their frames).
    shim._test_record_history("all", "all", "python", 1000, True, ["free_requested"])
    p = shim._test_alloc(MiB, 0, 0)
    shim._test_free(p)
    actions = [e["action"] for e in torch.cuda.memory._snapshot()["device_traces"][0]
               if e.get("addr") == p and not e["action"].startswith("segment")]
    assert actions == ["alloc", "free_completed"], actions
    shim._test_record_history("all", "all", "python", 4, True, ["segment_alloc", "segment_free"])
    ps = [shim._test_alloc(MiB, 0, 0) for _ in range(5)]
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    assert [(e["action"], e["addr"]) for e in trace] == [("alloc", p) for p in ps[1:]], trace
    assert all(here(e.get("frames")) for e in trace), trace
    for p in ps:
        shim._test_free(p)
    shim._test_record_history(None)

    # Off: no entries, no frames on live blocks.
    p = shim._test_alloc(2 * MiB, 0, 0)
    snap = torch.cuda.memory._snapshot()
    assert snap["device_traces"] == [[]], snap["device_traces"]
    seg, blk = live_block(snap, p)
    assert blk["state"] == "active_allocated" and not blk.get("frames"), blk
    shim._test_free(p)


def check_oom_observer():
    seen = []
    shim._test_attach_oom_observer(lambda *args: seen.append(args))
    want = 1 << 40
    try:
        shim._test_alloc(want, 0, 0)
        raise AssertionError("no OutOfMemoryError")
    except torch.OutOfMemoryError as e:
        assert "Requested" in str(e), str(e)
    total = int(os.environ.get("STREAMALLOC_SIM_CAPACITY", 1 << 30))
    assert len(seen) == 1, seen
    device, requested, total_seen, free = seen[0]
    assert device == 0 and requested >= want and total_seen == total and 0 < free <= total, seen
    # History records the OOM (free bytes in device_free, the request in size).
    shim._test_record_history("all", "all", "python", 100, True)
    try:
        shim._test_alloc(want, 0, 0)
    except torch.OutOfMemoryError:
        pass
    ooms = [e for e in torch.cuda.memory._snapshot()["device_traces"][0] if e["action"] == "oom"]
    shim._test_record_history(None)
    assert len(ooms) == 1 and ooms[0]["size"] >= want and 0 < ooms[0]["device_free"] <= total, ooms
    assert len(seen) == 2, seen

    # An observer's exception comes out of the allocation; the allocator goes on.
    class Boom(Exception):
        pass

    def boom(*args):
        raise Boom("observer")

    shim._test_attach_oom_observer(boom)
    try:
        shim._test_alloc(want, 0, 0)
        raise AssertionError("no exception")
    except Boom:
        pass
    assert len(seen) == 3, seen  # the first observer still ran
    p = shim._test_alloc(MiB, 0, 0)
    shim._test_free(p)
    assert torch._C._cuda_memoryStats(0)["allocated_bytes"]["all"]["current"] == 0


check_stats()
check_history_and_snapshot()
def allocated():
    return torch._C._cuda_memoryStats(0)["allocated_bytes"]["all"]["current"]


def reserved():
    return torch._C._cuda_memoryStats(0)["reserved_bytes"]["all"]["current"]


def check_pools():
    dev, pid = 0, (0, 4242)
    alloc0, reserved0 = allocated(), reserved()
    # torch.cuda.MemPool(): createOrIncrefPool; use_mem_pool: begin (a user more), the
    # thread's allocations, end, release.
    shim._test_create_or_incref_pool(dev, *pid)
    assert shim._test_pool_use_count(dev, *pid) == 1
    shim._test_begin_allocate_to_pool(dev, *pid, 0)
    assert shim._test_pool_use_count(dev, *pid) == 2
    a = shim._test_alloc(2 * MiB, 0, 0)
    b = shim._test_alloc(3 * MiB, 0, 0)
    other = []
    t = threading.Thread(target=lambda: other.append(shim._test_alloc(MiB, 0, 0)))
    t.start()
    t.join()
    shim._test_end_allocate_to_pool(dev, *pid)
    shim._test_release_pool(dev, *pid)
    assert shim._test_pool_use_count(dev, *pid) == 1
    # Only this thread's allocations went to the pool (use_mem_pool's filter).
    assert shim._test_check_pool_live(dev, *pid, [a, b])
    assert not shim._test_check_pool_live(dev, *pid, [a, b, other[0]])
    assert not shim._test_check_pool_live(dev, *pid, [a])
    assert torch._C._cuda_checkPoolLiveAllocations(dev, pid, {a, b})
    assert allocated() == alloc0 + 6 * MiB, (allocated(), alloc0)
    assert reserved() >= reserved0 + 5 * MiB
    shim._test_free(other[0])
    # Graph trees: checkpoint after a recording, then restore before the next one.
    h = shim._test_checkpoint(dev, *pid)
    assert torch._C._cuda_getCheckpointState(dev, pid) is not None
    shim._test_free(a)
    torch._C._cuda_beginAllocateToPool(dev, pid)  # every stream (PyTorch's binding)
    c = shim._test_alloc(4 * MiB, 0, 0)
    torch._C._cuda_endAllocateToPool(dev, pid)
    torch._C._cuda_releasePool(dev, pid)
    assert shim._test_check_pool_live(dev, *pid, [b, c])
    freed, allocd = shim._test_restore(dev, h)
    assert sorted(freed) == sorted([b, c]), (freed, b, c)
    assert sorted(allocd) == sorted([a, b]), (allocd, a, b)
    assert shim._test_check_pool_live(dev, *pid, [a, b])
    assert allocated() == alloc0 + 5 * MiB, (allocated(), alloc0)
    # A checkpoint of a pool nobody made, a release too many: refused with the message.
    try:
        shim._test_checkpoint(dev, 0, 4243)
        raise AssertionError("checkpoint of an unknown pool accepted")
    except RuntimeError as e:
        assert "no private pool (0, 4243)" in str(e), e
    # del tensors, del pool: the memory goes back.
    shim._test_free(a)
    shim._test_free(b)
    assert allocated() == alloc0
    shim._test_release_pool(dev, *pid)
    assert shim._test_pool_use_count(dev, *pid) == 0
    assert reserved() <= reserved0 + 4 * MiB, (reserved(), reserved0)  # c's block is free
    torch._C._cuda_emptyCache()
    # One release too many: a warning (TORCH_WARN on stderr here), never an exception
    # (releasePool runs in MemPool's and CUDAGraph's destructors).
    torch._C._cuda_releasePool(dev, pid)
    assert shim._test_pool_use_count(dev, *pid) == 0


check_oom_observer()
check_pools()
print("shim smoke test on the simulated device: ok")
