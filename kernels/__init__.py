"""Triton kernels of the fused vector ops (installed as ``bissl.kernels``).

One file per op, named like the op: ``_<op>_kernel`` (``@triton.jit``) plus a plain launcher
``<op>_triton`` with the op's schema (see :mod:`bissl.ops._library`). Launchers are *not*
registered here; whether they serve the ``bissl::<op>`` CUDA dispatch key is decided by
:mod:`bissl.ops._backends`, which imports the op modules lazily (they need triton) and records why
an import failed. This ``__init__`` imports nothing, so :mod:`bissl.kernels._checks` (input
validation shared by every backend's Python face) works without triton.
"""
