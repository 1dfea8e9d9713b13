"""streamalloc as PyTorch's CUDA allocator.

    import streamalloc_torch
    streamalloc_torch.install()          # before CUDA is first used
    x = torch.empty(1 << 20, device="cuda")

install() loads libstreamalloc.so (argument, env STREAMALLOC_LIB, or next to this
file), builds the small C++ shim torch_shim.cpp once (cached by
torch.utils.cpp_extension under STREAMALLOC_SHIM_CACHE or ~/.cache/streamalloc_torch),
and makes it PyTorch's allocator. With the shim, an allocation failure raises
torch.cuda.OutOfMemoryError with the seed's message, graph capture is routed to the
library's begin/end capture, and record_stream passes the stream's own device.

If the shim cannot be built (no compiler), install(require_shim=False) falls back to
torch.cuda.memory.CUDAPluggableAllocator on the library's plain C hooks: allocation
works, but PyTorch does not check for NULL (an OOM gives a tensor without memory; check
last_error()), and graph capture is not routed (do not capture with it).

Stats, peak reset, empty_cache, memory fraction and the last error come from the
library's own C functions (PyTorch does not route them to a pluggable allocator).
No dependencies beyond torch.
"""

import ctypes
import os

__all__ = [
    "install", "installed", "stats", "reset_peak", "empty_cache",
    "set_memory_fraction", "last_error", "backend", "cache_info", "lib_path",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
_lib = None
_lib_path = None
_mode = None  # "shim" or "plain"


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "reserved_current", "reserved_peak", "used_current", "used_peak",
        "allocated_current", "cached_current", "hits", "misses")]


def _find_lib(path):
    for cand in (path, os.environ.get("STREAMALLOC_LIB"),
                 os.path.join(_HERE, "libstreamalloc.so")):
        if cand and os.path.exists(cand):
            return os.path.abspath(cand)
    raise FileNotFoundError(
        "libstreamalloc.so not found: pass install(lib_path=...), set STREAMALLOC_LIB, "
        "or put it next to streamalloc_torch.py")


def _load(path):
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    vp, cs, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    lib.streamalloc_device_stats.argtypes = [i, ctypes.POINTER(_Stats)]
    lib.streamalloc_device_stats.restype = i
    lib.streamalloc_reset_peak_stats.argtypes = [i]
    lib.streamalloc_reset_peak_stats.restype = i
    lib.streamalloc_empty_cache.argtypes = []
    lib.streamalloc_empty_cache.restype = i
    lib.streamalloc_set_memory_fraction.argtypes = [ctypes.c_double, i]
    lib.streamalloc_set_memory_fraction.restype = None
    lib.streamalloc_last_error.argtypes = [ctypes.c_char_p, cs]
    lib.streamalloc_last_error.restype = i
    lib.streamalloc_last_error_code.argtypes = []
    lib.streamalloc_last_error_code.restype = i
    lib.streamalloc_backend.argtypes = []
    lib.streamalloc_backend.restype = ctypes.c_char_p
    lib.streamalloc_cache_info.argtypes = [i]
    lib.streamalloc_cache_info.restype = cs
    lib.streamalloc_alloc.argtypes = [cs, i, vp]
    lib.streamalloc_alloc.restype = vp
    _lib, _lib_path = lib, path
    return lib


def _build_shim():
    from torch.utils import cpp_extension
    cache = os.environ.get("STREAMALLOC_SHIM_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "streamalloc_torch"))
    os.makedirs(cache, exist_ok=True)
    src = os.environ.get("STREAMALLOC_SHIM_SRC", os.path.join(_HERE, "torch_shim.cpp"))
    if not os.path.exists(src):
        src = os.path.join(_HERE, "..", "torch_shim.cpp")
    try:
        return cpp_extension.load(
            name="streamalloc_torch_shim", sources=[src], build_directory=cache,
            extra_ldflags=["-ldl"], with_cuda=True,
            verbose=bool(os.environ.get("STREAMALLOC_VERBOSE")))
    except Exception as e:  # typically: ninja missing. Build with g++ directly.
        first = e
    try:
        return _build_shim_gxx(cpp_extension, src, cache)
    except Exception as e:
        raise RuntimeError(f"cpp_extension.load: {first}; direct g++ build: {e}") from e


def _build_shim_gxx(ce, src, cache):
    """Builds the shim with g++ without ninja (same flags as cpp_extension uses)."""
    import importlib.util
    import subprocess
    import sysconfig
    import torch
    out = os.path.join(cache, "streamalloc_torch_shim_gxx.so")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        try:
            incs, libs = ce.include_paths("cuda"), ce.library_paths("cuda")
        except TypeError:  # older torch
            incs, libs = ce.include_paths(cuda=True), ce.library_paths(cuda=True)
        abi = getattr(ce, "_get_pybind11_abi_build_flags", lambda: [])()
        cxx11 = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
        cmd = (["g++", "-O2", "-shared", "-fPIC", "-std=c++17", src, "-o", out + ".tmp",
                "-DTORCH_EXTENSION_NAME=streamalloc_torch_shim", "-DTORCH_API_INCLUDE_EXTENSION_H",
                f"-D_GLIBCXX_USE_CXX11_ABI={cxx11}", "-I" + sysconfig.get_paths()["include"]]
               + abi + ["-I" + d for d in incs] + ["-L" + d for d in libs]
               + ["-Wl,-rpath," + d for d in libs]
               + ["-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda", "-ltorch_python",
                  "-lcudart", "-ldl"])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("g++ failed: " + r.stderr[-4000:])
        os.replace(out + ".tmp", out)
    spec = importlib.util.spec_from_file_location("streamalloc_torch_shim", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def install(lib_path=None, require_shim=True):
    """Makes libstreamalloc PyTorch's CUDA allocator. Call before CUDA is first used.

    Returns "shim" or "plain" (the fallback, only when require_shim is False)."""
    global _mode
    if _mode is not None:
        return _mode
    import torch
    path = _find_lib(lib_path)
    _load(path)
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


def stats(device=0):
    """The device's statistics as a dict (bytes; hits/misses are counts)."""
    s = _Stats()
    _check(_require().streamalloc_device_stats(int(device), ctypes.byref(s)), "stats")
    return {name: int(getattr(s, name)) for name, _ in _Stats._fields_}


def reset_peak(device=0):
    """Resets the device's reserved and used high watermarks."""
    _check(_require().streamalloc_reset_peak_stats(int(device)), "reset_peak")


def empty_cache():
    """Synchronizes each used device and releases its pool's unused memory."""
    _check(_require().streamalloc_empty_cache(), "empty_cache")


def set_memory_fraction(fraction, device=0):
    """Limits the allocator's bytes on device to fraction of its memory."""
    lib = _require()
    lib.streamalloc_set_memory_fraction(float(fraction), int(device))
    _check(lib.streamalloc_last_error_code(), "set_memory_fraction")


def cache_info(device=0):
    """The largest block that can be allocated on device now (bytes)."""
    lib = _require()
    n = lib.streamalloc_cache_info(int(device))
    _check(lib.streamalloc_last_error_code(), "cache_info")
    return int(n)


def backend():
    """"cuda", "sim" or "none"."""
    return _require().streamalloc_backend().decode()


def lib_path():
    """The loaded library's path (None before loading)."""
    return _lib_path
