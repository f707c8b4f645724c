"""Triton kernel: CG search direction ``p = r + β p`` in place (reads r, p; writes p).

It cannot join :mod:`bissl.kernels.cg_step`'s pass: ``β = rᵀr_new / rᵀr_old`` needs that pass's
complete reduction first, and the next pass is the HVP of ``p`` itself.
"""

from __future__ import annotations

import triton
import triton.language as tl
from bissl.kernels._checks import check_flat_vectors, check_step_size
from bissl.kernels._common import elementwise_configs, scalar_on_device
from torch import Tensor


@triton.autotune(configs=elementwise_configs(), key=["n"], restore_value=["p_ptr"])
@triton.jit
def _cg_direction_kernel(p_ptr, r_ptr, beta_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    beta = tl.load(beta_ptr)
    p = tl.load(p_ptr + idx, mask=mask)
    r = tl.load(r_ptr + idx, mask=mask)
    tl.store(p_ptr + idx, r + beta * p, mask=mask)


def cg_direction_triton(p: Tensor, r: Tensor, beta: Tensor) -> None:
    """In place ``p = r + β p``; p, r: ``(P,)``; beta: one-element tensor."""
    check_flat_vectors("cg_direction_", "triton", p=p, r=r)
    check_step_size("cg_direction_", "triton", "beta", beta, p)
    n = p.numel()
    if n == 0:
        return
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _cg_direction_kernel[grid](p, r, scalar_on_device(beta, p), n)
