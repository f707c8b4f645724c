"""Triton kernel: ``a·x + b·y`` (the upper-level combination; reads 2 vectors, writes 1)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bissl.kernels._checks import check_flat_vectors
from bissl.kernels._common import elementwise_configs
from torch import Tensor


@triton.autotune(configs=elementwise_configs(), key=["n"])
@triton.jit
def _axpby_kernel(x_ptr, y_ptr, out_ptr, a: tl.float64, b: tl.float64, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask)
    y = tl.load(y_ptr + idx, mask=mask)
    tl.store(out_ptr + idx, (a * x + b * y).to(x.dtype), mask=mask)


def axpby_triton(a: float, x: Tensor, b: float, y: Tensor) -> Tensor:
    """``a·x + b·y``; x, y: ``(P,)``; returns a new ``(P,)`` tensor."""
    check_flat_vectors("axpby", "triton", x=x, y=y)
    n = x.numel()
    out = torch.empty_like(x)
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _axpby_kernel[grid](x, y, out, float(a), float(b), n)
    return out
