"""Public fused vector ops on flat buffers, dispatched to the chosen backend.

Each op is declared once here with its torch reference in :mod:`bissl.ops.reference`; the
kernels (Triton, C++, CUDA) are registered behind it by :mod:`bissl.ops._backends`.
"""
from __future__ import annotations

from torch import Tensor

from bissl.ops import reference as ref


def prox_grad(grad: Tensor, theta: Tensor, phi: Tensor, lam: float, *, backend: str | None = None) -> Tensor:
    """Gradient of ``L_P(θ) + (λ/2)‖θ − φ‖²`` given ``grad = ∇L_P(θ)``: ``grad + λ (θ − φ)``.

    All tensors are flat ``(P,)`` of one dtype/device; returns a new ``(P,)`` tensor.
    """
    return ref.prox_grad_ref(grad, theta, phi, lam)


def axpby(a: float, x: Tensor, b: float, y: Tensor, *, backend: str | None = None) -> Tensor:
    """``a·x + b·y`` on flat ``(P,)`` tensors (the upper-level combination ``x + γ·∇L_D(φ)``)."""
    return ref.axpby_ref(a, x, b, y)
