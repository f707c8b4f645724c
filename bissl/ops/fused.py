"""Public fused vector ops on flat buffers, dispatched to the chosen backend.

Each op is declared once (schema, fake kernel, torch reference as the default) in
:mod:`bissl.ops._library`; its backends (torch reference, C++ ``csrc/cpu``, CUDA ``csrc/cuda``,
Triton ``kernels/``) are chosen by :mod:`bissl.ops._backends`: ``backend=None`` means the
``BISSL_BACKEND`` environment variable, else ``"auto"`` (the fastest available for the device).

Contract shared by every op and backend: vectors are flat ``(P,)``, contiguous, of one dtype
(float32 or float64) and one device, and do not overlap; violations raise ``ValueError`` (or
``TypeError`` for a dtype) naming the argument. Step sizes ``alpha``/``beta`` are one-element
tensors that stay on the device (no host sync); ``scale``, ``shift``, ``lam``, ``a``, ``b`` are
Python numbers. Reductions (``vᵀAv``, ``rᵀr``) are deterministic for a given length (any thread
count); the C++ and CUDA kernels accumulate in float64, Triton sums each program's chunk in the
vector dtype (lane sums, then a tree) and the chunk partials in float64. The ops are leaves for
autograd: call them on detached buffers (under ``torch.no_grad()``); they have no autograd or
forward-mode rule.
"""

from __future__ import annotations

import numbers

from torch import Tensor

from bissl.kernels._checks import check_flat_vectors, check_step_size
from bissl.ops import _backends


def _number(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"bissl.{op}: {name} must be a Python number, got {type(value).__name__}")
    return float(value)


def _label(backend: str | None) -> str:
    return backend if backend is not None else "auto"


def damped_matvec(
    hv: Tensor, v: Tensor, scale: float, shift: float, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Damped matvec epilogue and its quadratic form: ``Av = scale·Hv + shift·v``, ``vᵀAv``.

    Args:
        hv: ``(P,)`` the raw matvec ``H v``.
        v: ``(P,)`` the vector it was applied to.
        scale, shift: the damped operator is ``A = scale·H + shift·I``.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``
            (default: ``BISSL_BACKEND``, else auto).

    Returns:
        ``(Av, vAv)``: a new ``(P,)`` tensor and a 0-dim tensor, both of ``hv``'s dtype.
    """
    check_flat_vectors("damped_matvec", _label(backend), hv=hv, v=v)
    scale, shift = (
        _number("damped_matvec", "scale", scale),
        _number("damped_matvec", "shift", shift),
    )
    _, fn = _backends.kernel("damped_matvec", backend, hv.device)
    return fn(hv, v, scale, shift)


def cg_step_(x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: Tensor, *, backend: str | None = None) -> Tensor:
    """One CG update in place, one pass: ``x += α p``, ``r -= α Ap``; returns the new ``rᵀr``.

    Args:
        x, r: ``(P,)`` iterate and residual, updated in place.
        p, ap: ``(P,)`` search direction and ``A p``.
        alpha: one-element tensor ``α`` (any floating dtype; used in the vectors' precision).
        backend: as :func:`damped_matvec`.

    Returns:
        0-dim tensor ``rᵀr`` of the updated residual, in ``x``'s dtype.
    """
    check_flat_vectors("cg_step_", _label(backend), x=x, r=r, p=p, ap=ap)
    check_step_size("cg_step_", _label(backend), "alpha", alpha, x)
    _, fn = _backends.kernel("cg_step_", backend, x.device)
    return fn(x, r, p, ap, alpha)


def cg_direction_(p: Tensor, r: Tensor, beta: Tensor, *, backend: str | None = None) -> Tensor:
    """New CG search direction in place: ``p = r + β p``; returns ``p``.

    Args:
        p: ``(P,)`` previous direction, updated in place.
        r: ``(P,)`` current residual.
        beta: one-element tensor ``β``.
        backend: as :func:`damped_matvec`.
    """
    check_flat_vectors("cg_direction_", _label(backend), p=p, r=r)
    check_step_size("cg_direction_", _label(backend), "beta", beta, p)
    _, fn = _backends.kernel("cg_direction_", backend, p.device)
    fn(p, r, beta)
    return p


def prox_grad(grad: Tensor, theta: Tensor, phi: Tensor, lam: float, *, backend: str | None = None) -> Tensor:
    """Gradient of ``L_P(θ) + (λ/2)‖θ − φ‖²`` given ``grad = ∇L_P(θ)``: ``grad + λ (θ − φ)``.

    All tensors are flat ``(P,)`` of one dtype/device; returns a new ``(P,)`` tensor.
    """
    check_flat_vectors("prox_grad", _label(backend), grad=grad, theta=theta, phi=phi)
    lam = _number("prox_grad", "lam", lam)
    _, fn = _backends.kernel("prox_grad", backend, grad.device)
    return fn(grad, theta, phi, lam)


def axpby(a: float, x: Tensor, b: float, y: Tensor, *, backend: str | None = None) -> Tensor:
    """``a·x + b·y`` on flat ``(P,)`` tensors (the upper-level combination ``x + γ·∇L_D(φ)``)."""
    check_flat_vectors("axpby", _label(backend), x=x, y=y)
    a, b = _number("axpby", "a", a), _number("axpby", "b", b)
    _, fn = _backends.kernel("axpby", backend, x.device)
    return fn(a, x, b, y)
