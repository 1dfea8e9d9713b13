"""streamalloc as PyTorch's CUDA allocator.

    import streamalloc_torch
    streamalloc_torch.install()          # before CUDA is first used
    x = torch.empty(1 << 20, device="cuda")
    torch.cuda.memory_allocated(), torch.cuda.memory_stats()   # answered by streamalloc

install() loads libstreamalloc.so (argument, env STREAMALLOC_LIB, or next to this
file, as the installed package has it), builds the small C++ shim torch_shim.cpp once
(cached by torch.utils.cpp_extension under STREAMALLOC_SHIM_CACHE or
~/.cache/streamalloc_torch; a C++ compiler is needed, a clear error says so when none
is found) and makes it PyTorch's allocator. With the shim, PyTorch's memory API works
as with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync: torch.cuda.memory_stats() and
the functions built on it, reset_peak_memory_stats(), cudnn.benchmark (cacheInfo),
cross-device copies (peer access to the pool), graph capture, record_stream, and an
allocation failure raises torch.cuda.OutOfMemoryError with the seed's message. Beyond the
seed: torch.cuda.memory._record_memory_history, _snapshot / _dump_snapshot (memory_viz's
pickle, with frames) and torch._C._cuda_attach_out_of_memory_observer. The library's
warnings arrive as Python UserWarnings.

Configuration: STREAMALLOC_CONF, e.g. "cache:on,max_cache_mb:2048" (see config() and
the README); install() checks it first and raises ValueError naming a bad key.

If the shim cannot be built, install(require_shim=False) falls back to
torch.cuda.memory.CUDAPluggableAllocator on the library's plain C hooks: allocation
works, but PyTorch does not check for NULL (an OOM gives a tensor without memory; check
last_error()), memory_stats and cudnn.benchmark fail, and graph capture is not routed.

stats(), reset_peak(), empty_cache(), set_memory_fraction(), last_error() call the
library directly (they work in either mode). No dependencies beyond torch.
"""

import ctypes
import os
import shutil

__all__ = [
    "install", "installed", "stats", "reset_peak", "reset_accumulated", "empty_cache",
    "set_memory_fraction", "last_error", "backend", "cache_info", "lib_path", "config",
    "check_config",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
_lib = None
_lib_path = None
_mode = None  # "shim" or "plain"
_shim = None  # the compiled shim module once install() made it PyTorch's allocator

# streamalloc_memory_stats in streamalloc.h (fields only ever added at the end).
_STAT_FIELDS = (
    "allocated_current", "allocated_peak", "allocated_total", "freed_total",
    "allocations_current", "allocations_peak", "allocations_total", "frees_total",
    "reserved_current", "reserved_peak", "pool_used_current", "pool_used_peak",
    "cached_current", "cache_hits", "cache_misses", "num_alloc_retries", "num_ooms")


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _STAT_FIELDS]


def _find_lib(path):
    for cand in (path, os.environ.get("STREAMALLOC_LIB"),
                 os.path.join(_HERE, "libstreamalloc.so")):
        if cand and os.path.exists(cand):
            return os.path.abspath(cand)
    raise FileNotFoundError(
        "libstreamalloc.so not found: pass install(lib_path=...), set STREAMALLOC_LIB, "
        "or install the package (pip install . from the repository)")


def _find_source(name):
    """A shim source file: next to this module (installed package), or in src/capi/."""
    for cand in (os.path.join(_HERE, name), os.path.join(_HERE, "..", name)):
        if os.path.exists(cand):
            return os.path.abspath(cand)
    raise FileNotFoundError(f"{name} not found next to {__file__} or in its parent")


def _load(path):
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    vp, cs, i, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p
    sig = {
        "streamalloc_device_memory_stats": ([i, ctypes.POINTER(_Stats), cs], i),
        "streamalloc_reset_peak_stats": ([i], i),
        "streamalloc_reset_accumulated_stats": ([i], i),
        "streamalloc_empty_cache": ([], i),
        "streamalloc_set_memory_fraction": ([ctypes.c_double, i], None),
        "streamalloc_last_error": ([cp, cs], i),
        "streamalloc_last_error_code": ([], i),
        "streamalloc_backend": ([], cp),
        "streamalloc_cache_info_on": ([i, vp, ctypes.POINTER(cs)], i),
        "streamalloc_alloc": ([cs, i, vp], vp),
        "streamalloc_free": ([vp, cs, i, vp], None),
        "streamalloc_parse_config": ([cp], i),
        "streamalloc_config": ([cp, cs], i),
    }
    for name, (args, res) in sig.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    _lib, _lib_path = lib, path
    return lib


def _compiler():
    """The C++ compiler the shim is built with, or a clear error."""
    names = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    for name in filter(None, names):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "streamalloc: no C++ compiler found (looked for $CXX, c++, g++, clang++). The "
        "PyTorch shim is compiled once on first use: install one (for example "
        "`apt-get install g++`) or set CXX; install(require_shim=False) runs without the "
        "shim (no OutOfMemoryError, no memory_stats, no cudnn.benchmark)")


def _build_shim():
    from torch.utils import cpp_extension
    cxx = _compiler()
    cache = os.environ.get("STREAMALLOC_SHIM_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "streamalloc_torch"))
    os.makedirs(cache, exist_ok=True)
    src = os.environ.get("STREAMALLOC_SHIM_SRC") or _find_source("torch_shim.cpp")
    include = os.path.dirname(_find_source("streamalloc.h"))
    verbose = bool(os.environ.get("STREAMALLOC_VERBOSE"))
    if shutil.which("ninja") or _has_ninja_module():
        try:
            return cpp_extension.load(
                name="streamalloc_torch_shim", sources=[src], build_directory=cache,
                extra_include_paths=[include], extra_ldflags=["-ldl"], with_cuda=True,
                verbose=verbose)
        except Exception as e:  # noqa: BLE001 - fall back to a direct compiler call
            first = e
    else:
        first = "ninja not found"
    try:
        return _build_shim_direct(cpp_extension, cxx, src, include, cache)
    except Exception as e:
        raise RuntimeError(f"cpp_extension.load: {first}; direct {cxx} build: {e}") from e


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


def _build_shim_direct(ce, cxx, src, include, cache):
    """Builds the shim with the compiler directly (no ninja), with cpp_extension's flags."""
    import importlib.util
    import subprocess
    import sysconfig
    import torch
    out = os.path.join(cache, "streamalloc_torch_shim_direct.so")
    newest = max(os.path.getmtime(src), os.path.getmtime(os.path.join(include, "streamalloc.h")))
    if not os.path.exists(out) or os.path.getmtime(out) < newest:
        try:
            incs, libs = ce.include_paths("cuda"), ce.library_paths("cuda")
        except TypeError:  # older torch
            incs, libs = ce.include_paths(cuda=True), ce.library_paths(cuda=True)
        abi = getattr(ce, "_get_pybind11_abi_build_flags", lambda: [])()
        cxx11 = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
        cmd = ([cxx, "-O2", "-shared", "-fPIC", "-std=c++17", src, "-o", out + ".tmp",
                "-DTORCH_EXTENSION_NAME=streamalloc_torch_shim", "-DTORCH_API_INCLUDE_EXTENSION_H",
                f"-D_GLIBCXX_USE_CXX11_ABI={cxx11}", "-I" + include,
                "-I" + sysconfig.get_paths()["include"]]
               + abi + ["-I" + d for d in incs] + ["-L" + d for d in libs]
               + ["-Wl,-rpath," + d for d in libs]
               + ["-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda", "-ltorch_python",
                  "-lcudart", "-ldl"])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("compiler failed: " + r.stderr[-4000:])
        os.replace(out + ".tmp", out)
    spec = importlib.util.spec_from_file_location("streamalloc_torch_shim", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def install(lib_path=None, require_shim=True):
    """Makes libstreamalloc PyTorch's CUDA allocator. Call before CUDA is first used.

    Returns "shim" or "plain" (the fallback, only when require_shim is False)."""
    global _mode, _shim
    if _mode is not None:
        return _mode
    import torch
    path = _find_lib(lib_path)
    _load(path)
    conf = os.environ.get("STREAMALLOC_CONF")
    if conf is not None:
        check_config(conf)
    try:
        shim = _build_shim()
    except Exception as e:  # no compiler, no CUDA headers...
        if require_shim:
            raise RuntimeError(f"streamalloc: building the PyTorch shim failed: {e}") from e
        alloc = torch.cuda.memory.CUDAPluggableAllocator(path, "streamalloc_alloc", "streamalloc_free")
        torch.cuda.memory.change_current_allocator(alloc)
        _mode = "plain"
        return _mode
    shim.install(path)
    _shim = shim
    _mode = "shim"
    return _mode


def installed():
    """"shim", "plain", or None."""
    return _mode


def _require():
    if _lib is None:
        _load(_find_lib(None))
    return _lib


def last_error():
    """(code, message) of this thread's last library call (0: success)."""
    lib = _require()
    buf = ctypes.create_string_buffer(4096)
    code = lib.streamalloc_last_error(buf, len(buf))
    return code, buf.value.decode(errors="replace")


def _check(code, what):
    if code != 0:
        c, msg = last_error()
        raise RuntimeError(f"streamalloc {what} failed (code {c}): {msg}")


def check_config(conf):
    """Raises ValueError naming the problem if conf is not a valid STREAMALLOC_CONF."""
    lib = _require()
    if lib.streamalloc_parse_config(conf.encode()) != 0:
        raise ValueError(last_error()[1])


def config():
    """The allocator's configuration in STREAMALLOC_CONF form (every key)."""
    lib = _require()
    buf = ctypes.create_string_buffer(1024)
    _check(lib.streamalloc_config(buf, len(buf)), "config")
    return buf.value.decode()


def stats(device=0):
    """The device's memory statistics as a dict (streamalloc_memory_stats in
    streamalloc.h: exact allocated bytes and counts, pool reserved and used bytes,
    cache hits and misses, num_alloc_retries, num_ooms)."""
    s = _Stats()
    _check(_require().streamalloc_device_memory_stats(int(device), ctypes.byref(s),
                                                      ctypes.sizeof(s)), "stats")
    return {name: int(getattr(s, name)) for name in _STAT_FIELDS}


def reset_peak(device=0):
    """Resets the device's high watermarks (as torch.cuda.reset_peak_memory_stats)."""
    _check(_require().streamalloc_reset_peak_stats(int(device)), "reset_peak")


def reset_accumulated(device=0):
    """Resets the device's totals (as torch.cuda.reset_accumulated_memory_stats)."""
    _check(_require().streamalloc_reset_accumulated_stats(int(device)), "reset_accumulated")


def empty_cache():
    """Synchronizes each used device and releases its pool's unused memory."""
    _check(_require().streamalloc_empty_cache(), "empty_cache")


def set_memory_fraction(fraction, device=0):
    """Limits the allocator's bytes on device to fraction of its memory."""
    lib = _require()
    lib.streamalloc_set_memory_fraction(float(fraction), int(device))
    _check(lib.streamalloc_last_error_code(), "set_memory_fraction")


def cache_info(device=0, stream=None):
    """The largest block that can be allocated on device now (bytes), by trial
    allocations on stream (a cudaStream_t as an int; default the legacy stream)."""
    out = ctypes.c_size_t(0)
    _check(_require().streamalloc_cache_info_on(int(device), stream, ctypes.byref(out)),
           "cache_info")
    return int(out.value)


def backend():
    """"cuda", "sim" or "none"."""
    return _require().streamalloc_backend().decode()


def lib_path():
    """The loaded library's path (None before loading)."""
    return _lib_path
