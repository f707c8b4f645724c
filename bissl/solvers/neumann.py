"""Cheaper inverse approximations behind the solver signature: truncated Neumann series, identity."""
from __future__ import annotations

from typing import Callable

import torch

from bissl.solvers._problem import dot, linear_problem
from bissl.solvers.cg import _check_iters, _tolerance2
from bissl.solvers.result import SolveResult
from bissl.typing import Vector


def neumann_solve(
    matvec: Callable[[Vector], Vector],
    b: Vector,
    *,
    iters: int,
    damping: float = 0.0,
    scale: float = 1.0,
    step: float | None = None,
    strict: bool = False,
) -> SolveResult:
    """Truncated Neumann series for ``(scale·A + damping·I)⁻¹ b``.

    ``x_K = η Σ_{k<K} (I − η M)^k b`` with ``M = scale·A + damping·I``, computed as the Richardson
    iteration ``x ← x + η (b − M x)`` from ``x = 0`` (``iters − 1`` matvecs for ``iters`` terms).
    It converges iff the spectrum of ``η M`` lies in ``(0, 2)``; for BiSSL's ``I + H/(λ+damp)``
    with ``η = 1`` that means ``‖H‖ < λ + damp``.

    Args:
        step: η (default: ``1/damping`` if ``damping > 0`` else 1).
        others: as :func:`~bissl.solvers.cg_solve` (fixed number of terms, no host sync).

    Returns:
        :class:`~bissl.solvers.SolveResult`. ``residual_norm`` is ``‖b − M x‖`` of the iterate
        *before* the last update (the last residual the recursion computes); ``nonfinite`` flags
        NaN/Inf; divergence shows as a growing residual (``converged`` stays False).
    """
    _check_iters(iters, "neumann_solve")
    prob = linear_problem(matvec, b, scale, damping, "neumann_solve")
    eta = step if step is not None else (1.0 / prob.shift if prob.shift > 0 else 1.0)
    if eta <= 0:
        raise ValueError(f"neumann_solve: step must be positive, got {eta}")
    x = torch.zeros_like(prob.b)
    r = prob.b.clone()
    mx = prob.empty()  # the damped matvec's output, reused every iteration
    for k in range(iters):
        if k > 0:
            mx, _ = prob.apply(x, mx)
            torch.sub(prob.b, mx, out=r)
        x.add_(r, alpha=eta)
    rr = dot(r, r)
    bb = dot(prob.b, prob.b)
    nonfinite = ~torch.isfinite(x).all() | ~torch.isfinite(rr)
    zero = torch.zeros((), dtype=torch.bool, device=x.device)
    result = SolveResult(
        x=prob.views(x), iters=torch.tensor(iters, device=x.device), residual_norm=rr.sqrt(),
        b_norm=bb.sqrt(), converged=(rr <= _tolerance2(bb, None, 0.0)) & ~nonfinite,
        negative_curvature=zero, nonfinite=nonfinite, method="neumann",
    )
    return result.check() if strict else result


def identity_solve(
    matvec: Callable[[Vector], Vector] | None,
    b: Vector,
    *,
    iters: int = 0,
    damping: float = 0.0,
    scale: float = 1.0,
    strict: bool = False,
) -> SolveResult:
    """First-order approximation: ignore ``A``, ``x = b / damping`` (``x = b`` when ``damping`` is 0).

    For BiSSL's ``(I + H/(λ+damp)) x = v`` (``damping = 1``) this is ``x = v``: ``dθ*/dφ ≈ I``.
    No matvec is made; ``matvec`` and ``iters`` are accepted for a uniform solver signature.
    ``residual_norm`` is not computed (NaN) because that would need a matvec.
    """
    prob = linear_problem(matvec, b, scale, damping, "identity_solve")
    b_norm = dot(prob.b, prob.b).sqrt()
    # prob.b is the solver's own copy of b: x may take its storage.
    x = prob.b.div_(prob.shift) if prob.shift > 0 else prob.b
    zero = torch.zeros((), dtype=torch.bool, device=x.device)
    nonfinite = ~torch.isfinite(x).all()
    result = SolveResult(
        x=prob.views(x), iters=torch.zeros((), dtype=torch.int64, device=x.device),
        residual_norm=torch.full((), float("nan"), dtype=x.dtype, device=x.device),
        b_norm=b_norm, converged=zero, negative_curvature=zero, nonfinite=nonfinite,
        method="identity", needs_positive_definite=False,
    )
    return result.check() if strict else result
