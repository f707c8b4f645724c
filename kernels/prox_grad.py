"""Triton kernel: proximal gradient ``grad + λ (θ − φ)`` (reads 3 vectors, writes 1)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bissl.kernels._checks import check_flat_vectors
from bissl.kernels._common import elementwise_configs
from torch import Tensor


@triton.autotune(configs=elementwise_configs(), key=["n"])
@triton.jit
def _prox_grad_kernel(
    grad_ptr, theta_ptr, phi_ptr, out_ptr, lam: tl.float64, n, BLOCK: tl.constexpr
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    grad = tl.load(grad_ptr + idx, mask=mask)
    theta = tl.load(theta_ptr + idx, mask=mask)
    phi = tl.load(phi_ptr + idx, mask=mask)
    tl.store(out_ptr + idx, (grad + lam * (theta - phi)).to(grad.dtype), mask=mask)


def prox_grad_triton(grad: Tensor, theta: Tensor, phi: Tensor, lam: float) -> Tensor:
    """``grad + λ (θ − φ)``; all ``(P,)``; returns a new ``(P,)`` tensor."""
    check_flat_vectors("prox_grad", "triton", grad=grad, theta=theta, phi=phi)
    n = grad.numel()
    out = torch.empty_like(grad)
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _prox_grad_kernel[grid](grad, theta, phi, out, float(lam), n)
    return out
