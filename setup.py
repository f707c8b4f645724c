"""Build script: the pure-Python package always; the C++ (CPU) extension when it can.

``pip install --no-build-isolation -e .`` after torch is installed builds ``bissl._C`` from
``csrc/cpu/*.cpp`` with ninja at ``-O3`` and OpenMP. The extension is optional: no torch in the
build environment, no compiler, ``BISSL_NO_EXT=1`` or a failed compile all leave a working
pure-torch install (the dispatcher falls back, see ``bissl/ops/_backends.py``).

CUDA sources (``csrc/cuda/*.cu``) are *not* linked here: a torch CUDA extension cannot link
against the CPU torch wheel. They are compiled by ``make cuda-check`` with plain ``nvcc -c`` and
loaded at run time on GPU machines (``bissl/ops/_backends.py``).
"""
from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpp_extensions():
    """Return (ext_modules, cmdclass) for the optional CPU extension, or empty ones."""
    if os.environ.get("BISSL_NO_EXT", "0") == "1":
        print("bissl: BISSL_NO_EXT=1, skipping the C++ extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("bissl: no C++ compiler found, skipping the C++ extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("bissl: torch is not importable in the build environment "
              "(use --no-build-isolation); skipping the C++ extension")
        return [], {}
    ext = CppExtension(
        name="bissl._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # -fno-trapping-math: lets the compiler turn the kernels' float selects into vector blends
        # (values are unchanged; only floating-point exception flags are not preserved).
        extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    # optional=True: a failed compile warns and the install continues without the extension.
    ext.optional = True
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cpp_extensions()

setup(
    packages=find_packages(include=["bissl", "bissl.*"]) + ["bissl.kernels"],
    package_dir={"bissl": "bissl", "bissl.kernels": "kernels"},
    package_data={"bissl": ["py.typed"], "bissl.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
