"""MINRES for symmetric, possibly indefinite ``(scale·A + damping·I) x = b`` with a matrix-free ``A``.

Paige & Saunders, "Solution of sparse indefinite systems of linear equations", SIAM J. Numer. Anal.
12(4), 1975. With ``M = scale·A + damping·I``, Lanczos builds an orthonormal basis ``V_k`` of the
Krylov space ``K_k(M, r₀)`` and the ``(k+1)×k`` tridiagonal ``T̄_k`` with ``M V_k = V_{k+1} T̄_k``.
MINRES picks ``x_k = x₀ + V_k y`` minimising ``‖r₀ − M V_k y‖ = ‖β₁e₁ − T̄_k y‖``: a small least-squares
problem solved by updating a QR factorisation of ``T̄_k`` with one Givens rotation per iteration. The
solution is updated through the directions ``W_k = V_k R_k⁻¹`` (three-term recurrence), so only five
vectors are kept. Unlike CG it needs no positive definiteness: it is the remedy when
``I + H/(λ+damp)`` is indefinite. Its residual norm never increases.

Per iteration ``j`` (rotations ``G = [[c, s], [−s, c]]``; ``β₁ = 0`` inside the matrix)::

    α_j = v_jᵀ M v_j;  p = M v_j − α_j v_j − β_j v_{j−1};  β_{j+1} = ‖p‖;  v_{j+1} = p / β_{j+1}
    ε_j = s_{j−2} β_j;  δ'_j = c_{j−2} β_j                   (rotation G_{j−2} on column j)
    δ_j = c_{j−1} δ'_j + s_{j−1} α_j;  γ̄_j = −s_{j−1} δ'_j + c_{j−1} α_j   (rotation G_{j−1})
    γ_j = hypot(γ̄_j, β_{j+1});  c_j = γ̄_j/γ_j;  s_j = β_{j+1}/γ_j       (new rotation G_j)
    τ_j = c_j φ̄_j;  φ̄_{j+1} = −s_j φ̄_j                     (right-hand side; ‖r_j‖ = |φ̄_{j+1}|)
    w_j = (v_j − δ_j w_{j−1} − ε_j w_{j−2}) / γ_j;  x_j = x_{j−1} + τ_j w_j

Fixed-iteration mode (``rtol=None``, ``atol=0``) makes **no host synchronisation**, as
:func:`~bissl.solvers.cg_solve`: scalars stay 0-dim device tensors, and once the residual reaches the
target (or NaN/Inf appears, or ``γ_j = 0``: a singular system) ``x`` is frozen by ``torch.where``
while the remaining matvecs run on. The Lanczos ``α_j, β_{j+1}`` give Ritz estimates of ``M``'s
spectrum for free (:mod:`bissl.solvers.lanczos`); a negative Ritz value sets ``indefinite``, which
for MINRES is information, not a problem.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bissl.solvers._problem import linear_problem, tiny
from bissl.solvers.cg import _check_iters, _tolerance2
from bissl.solvers.lanczos import lanczos_tridiagonal
from bissl.solvers.result import SolveResult
from bissl.solvers.workspace import Workspace
from bissl.typing import Vector


def minres_solve(
    matvec: Callable[[Vector], Vector],
    b: Vector,
    *,
    iters: int,
    damping: float = 0.0,
    scale: float = 1.0,
    rtol: float | None = None,
    atol: float = 0.0,
    x0: Vector | None = None,
    strict: bool = False,
    backend: str | None = None,
    allreduce: Callable[[Tensor], Tensor] | None = None,
    workspace: Workspace | None = None,
) -> SolveResult:
    """Solve the symmetric (possibly indefinite) ``(scale·A + damping·I) x = b`` by MINRES.

    Args:
        matvec: ``v ↦ A v`` for symmetric ``A``; given views of the solver's buffer in ``b``'s form,
            it may return a dict, a tuple/list or a flat tensor (as :func:`~bissl.solvers.cg_solve`).
        b: right-hand side: a dict, a tuple/list of tensors or a flat ``(P,)`` tensor.
        iters: number of iterations (the maximum with a tolerance). One matvec each.
        damping: ``shift`` added to the diagonal (default: 0.0).
        scale: multiplies ``A`` (default: 1.0).
        rtol, atol: stop when ``‖r‖ ≤ max(rtol·‖b‖, atol)`` (one host sync per iteration). With
            neither given (default) exactly ``iters`` matvecs run with zero host syncs.
        x0: initial guess in any form laid out like ``b`` (default: zeros).
        strict: raise :class:`~bissl.solvers.SolverError` on NaN/Inf or (with a tolerance)
            non-convergence (default: False). Indefiniteness is never an error for MINRES.
        backend: vector-op backend for the damped matvec (default: ``BISSL_BACKEND`` or auto).
        allreduce: ``b`` is this rank's partition (see :func:`~bissl.solvers.cg_solve`).
        workspace: holds ``b``'s copy and the matvec's output across calls (as
            :func:`~bissl.solvers.cg_solve`; MINRES's short recurrences make their own vectors).

    Returns:
        :class:`~bissl.solvers.SolveResult` with ``x`` in ``b``'s form; ``alphas``/``betas`` are the
        Lanczos ``α_j``/``β_{j+1}`` (0 where an iteration did not update ``x``), ``residual_norm`` is
        the recursion's ``|φ̄|`` (equal to ``‖b − Mx‖`` in exact arithmetic), ``negative_curvature``
        is always False (not applicable) and ``indefinite`` reports a non-positive Ritz value.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -3.0]], dtype=torch.float64)   # indefinite
        >>> minres_solve(lambda v: A @ v, torch.tensor([1.0, 0.0], dtype=torch.float64), iters=2).x
        tensor([0.4286, 0.2857], dtype=torch.float64)
    """
    _check_iters(iters, "minres_solve")
    prob = linear_problem(matvec, b, scale, damping, "minres_solve", backend, allreduce, workspace)
    use_tol = rtol is not None or atol > 0.0
    bb = prob.dot(prob.b, prob.b)
    tol2 = _tolerance2(bb, rtol, atol)
    guard = tiny(prob.b.dtype)
    mv = prob.empty("mv")  # the damped matvec's output, reused every iteration

    if x0 is None:
        x = torch.zeros_like(prob.b)
        r0 = prob.b
    else:
        x = prob.from_user(x0, "minres_solve: x0")
        mx, _ = prob.apply(x, mv)
        r0 = prob.b.sub_(mx)
    beta1 = prob.norm(r0)
    phibar = beta1.clone()  # |φ̄| is the current residual norm
    active = (beta1**2 > tol2) & torch.isfinite(beta1)
    nonfinite = ~torch.isfinite(beta1)
    v = r0 / torch.where(active, beta1, 1)
    v_prev = torch.zeros_like(v)
    w1, w2 = torch.zeros_like(v), torch.zeros_like(v)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    beta = zero.clone()  # β_j as a matrix entry: 0 above the first column
    c1, s1, c2, s2 = one.clone(), zero.clone(), one.clone(), zero.clone()
    residual = beta1.clone()
    n_iters = torch.zeros((), dtype=torch.int64, device=x.device)
    alphas, betas, valid = [], [], []
    for _ in range(iters):
        if use_tol and not bool(active):
            break
        mv, alpha = prob.apply(v, mv)
        p = mv - alpha * v - beta * v_prev
        beta_next = prob.norm(p)
        eps = s2 * beta
        delta_tmp = c2 * beta
        delta = c1 * delta_tmp + s1 * alpha
        gamma_bar = -s1 * delta_tmp + c1 * alpha
        gamma = torch.hypot(gamma_bar, beta_next)
        finite = torch.isfinite(alpha) & torch.isfinite(beta_next)
        nonfinite |= active & ~finite
        step = active & finite & (gamma > guard)  # γ = 0 only for a singular M: stop, x stays put
        gamma_safe = torch.where(step, gamma, 1)
        c = torch.where(step, gamma_bar / gamma_safe, c1)
        s = torch.where(step, beta_next / gamma_safe, s1)
        tau = c * phibar
        w = (v - delta * w1 - eps * w2) / gamma_safe
        x = torch.where(step, x + tau * w, x)
        phibar = torch.where(step, -s * phibar, phibar)
        residual = torch.where(step, phibar.abs(), residual)
        n_iters += step.to(torch.int64)
        alphas.append(torch.where(step, alpha, 0))
        betas.append(torch.where(step, beta_next, 0))
        valid.append(step)
        # An exact β_{j+1} = 0 (invariant Krylov space) also gives φ̄ = 0: the residual test stops it.
        active = step & (phibar**2 > tol2)
        v_prev, v = v, p / torch.where(beta_next > 0, beta_next, 1)
        w2, w1 = w1, w
        c2, s2, c1, s1 = c1, s1, c, s
        beta = beta_next
    prob.finish()

    if alphas:
        alphas_t, betas_t, valid_t = torch.stack(alphas), torch.stack(betas), torch.stack(valid)
    else:
        alphas_t, betas_t = x.new_zeros(0), x.new_zeros(0)
        valid_t = torch.zeros(0, dtype=torch.bool, device=x.device)
    result = SolveResult(
        x=prob.views(x),
        iters=n_iters,
        residual_norm=residual,
        b_norm=bb.sqrt(),
        converged=(residual**2 <= tol2) & ~nonfinite,
        negative_curvature=torch.zeros((), dtype=torch.bool, device=x.device),
        nonfinite=nonfinite,
        alphas=alphas_t,
        betas=betas_t,
        method="minres",
        tolerance_requested=use_tol,
        tridiagonal=lanczos_tridiagonal(alphas_t, betas_t, valid_t),
        needs_positive_definite=False,
    )
    return result.check() if strict else result
