"""Builds the `streamalloc_torch` package: the Python module (src/capi/python/
streamalloc_torch.py, as the package's __init__), libstreamalloc.so (cargo build
--release --lib; or STREAMALLOC_PREBUILT_LIB=<path> to package a library built before),
and the shim's sources (src/capi/torch_shim.cpp, src/capi/streamalloc.h), which the module
compiles against the installed torch on first use (a C++ compiler is needed then).

The wheel is tagged py3-none-<platform>: the library is loaded with ctypes and dlopen,
not as a Python extension, so any CPython 3 on the platform takes it.
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))
CAPI = os.path.join(ROOT, "src", "capi")


def built_library():
    prebuilt = os.environ.get("STREAMALLOC_PREBUILT_LIB")
    if prebuilt:
        if not os.path.isfile(prebuilt):
            raise SystemExit(f"STREAMALLOC_PREBUILT_LIB={prebuilt}: no such file")
        return prebuilt
    cargo = shutil.which("cargo")
    if cargo is None:
        raise SystemExit(
            "streamalloc_torch: cargo not found. Building the package compiles the Rust "
            "library: install Rust (https://rustup.rs), or set STREAMALLOC_PREBUILT_LIB to a "
            "libstreamalloc.so built elsewhere, or install a wheel built on a machine with "
            "Rust (pip wheel --no-deps -w dist .).")
    subprocess.check_call([cargo, "build", "--release", "--lib"], cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release", "libstreamalloc.so")


class BuildPy(build_py):
    """Assembles the package directory in the build tree."""

    def run(self):
        super().run()
        pkg = os.path.join(self.build_lib, "streamalloc_torch")
        os.makedirs(pkg, exist_ok=True)
        shutil.copyfile(os.path.join(CAPI, "python", "streamalloc_torch.py"),
                        os.path.join(pkg, "__init__.py"))
        for name in ("torch_shim.cpp", "streamalloc.h"):
            shutil.copyfile(os.path.join(CAPI, name), os.path.join(pkg, name))
        lib = os.path.join(pkg, "libstreamalloc.so")
        shutil.copyfile(built_library(), lib)
        os.chmod(lib, 0o755)


class PlatformDistribution(Distribution):
    """A package with a native library (platform wheel) and files made by BuildPy."""

    def has_pure_modules(self):
        return True

    def has_ext_modules(self):
        return True


class Wheel(bdist_wheel):
    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    name="streamalloc-torch",
    version="0.1.0",
    description="streamalloc, a lock-free stream-ordered CUDA allocator, as PyTorch's allocator",
    python_requires=">=3.8",
    packages=[],  # no discovery: the package is assembled by BuildPy
    py_modules=[],
    distclass=PlatformDistribution,
    cmdclass={"build_py": BuildPy, "bdist_wheel": Wheel},
    zip_safe=False,
)
