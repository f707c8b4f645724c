"""Triton kernel: one CG update ``x += α p``, ``r -= α Ap`` and the new ``rᵀr`` in one pass.

Reads x, r, p, Ap and writes x, r (6 vector passes; torch needs 2 temporaries and a separate dot:
about 11). ``α`` is read from device memory, so the CG loop never syncs with the host.
"""

from __future__ import annotations

import triton
import triton.language as tl
from bissl.kernels._checks import check_flat_vectors, check_step_size
from bissl.kernels._common import (
    partials_buffer,
    reduction_chunk,
    reduction_configs,
    scalar_on_device,
    sum_partials,
)
from torch import Tensor


@triton.autotune(configs=reduction_configs(), key=["n", "CHUNK"], restore_value=["x_ptr", "r_ptr"])
@triton.jit
def _cg_step_kernel(
    x_ptr,
    r_ptr,
    p_ptr,
    ap_ptr,
    alpha_ptr,
    partial_ptr,
    n,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    alpha = tl.load(alpha_ptr)
    acc = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
        r = tl.load(r_ptr + idx, mask=mask, other=0.0)
        p = tl.load(p_ptr + idx, mask=mask, other=0.0)
        ap = tl.load(ap_ptr + idx, mask=mask, other=0.0)
        x = x + alpha * p
        r = r - alpha * ap
        tl.store(x_ptr + idx, x, mask=mask)
        tl.store(r_ptr + idx, r, mask=mask)
        acc += r * r  # masked lanes are 0 - α·0 = 0
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


def cg_step_triton(x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: Tensor) -> Tensor:
    """In place ``x += α p``, ``r -= α Ap``; returns the new ``rᵀr`` (0-dim). Vectors ``(P,)``."""
    check_flat_vectors("cg_step_", "triton", x=x, r=r, p=p, ap=ap)
    check_step_size("cg_step_", "triton", "alpha", alpha, x)
    n = x.numel()
    if n == 0:
        return x.new_zeros(())
    chunk = reduction_chunk(n)
    partials = partials_buffer(n, chunk, x)
    _cg_step_kernel[(partials.numel(),)](
        x, r, p, ap, scalar_on_device(alpha, x), partials, n, CHUNK=chunk
    )
    return sum_partials(partials, x.dtype)
