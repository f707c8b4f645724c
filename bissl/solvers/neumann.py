"""Cheaper inverse approximations behind the solver signature: truncated Neumann series, identity."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bissl.solvers._problem import LinearProblem, linear_problem, tiny
from bissl.solvers.cg import _check_iters, _tolerance2
from bissl.solvers.lanczos import Tridiagonal, lanczos_tridiagonal
from bissl.solvers.result import SolverError, SolveResult
from bissl.solvers.workspace import Workspace
from bissl.typing import Vector

#: Most Lanczos vectors :func:`neumann_solve` keeps (memory: ``LANCZOS_STEPS + 1`` vectors of P).
LANCZOS_STEPS = 10


def _damped(prob: LinearProblem, v: Tensor) -> Tensor:
    """``M v`` into the work buffer ``mv`` (read before the next call: the basis copies what it keeps)."""
    return prob.apply(v, prob.empty("mv"))[0]


def _lanczos(prob: LinearProblem, steps: int) -> tuple[Tensor, Tensor, Tridiagonal, Tensor]:
    """``steps`` Lanczos steps on ``M = scale·A + shift·I`` from ``q_1 = b/‖b‖``.

    Full reorthogonalisation (one classical Gram–Schmidt pass per step, ``O(j·P)``) keeps the basis
    orthonormal, so the Ritz values are Rayleigh quotients of ``M`` and coordinate norms are vector
    norms. A zero ``β`` (``b = 0``, or an exactly invariant Krylov space) zeroes the next vector
    and the rows after it are marked invalid; no host synchronisation.

    Returns:
        ``(Q, T̃, tridiagonal, ‖b‖)``: ``Q`` ``(steps+1, P)`` with ``M Q[:steps]ᵀ = Q ᵀ T̃`` up to
        rounding, ``T̃`` ``(steps+1, steps)`` float64 (diagonal ``α_j``, both off-diagonals
        ``β_{j+1}``), the ``steps × steps`` tridiagonal of the Ritz values, and ``‖b‖`` (0-dim).
    """
    b = prob.b
    floor = tiny(b.dtype)
    beta0 = prob.dot(b, b).clamp_min(0).sqrt()
    Q = prob.empty("lanczos_basis", rows=steps + 1)  # every row is written below
    Q[0] = torch.where(beta0 > floor, b / torch.where(beta0 > floor, beta0, 1), 0)
    alphas, betas = b.new_zeros(steps), b.new_zeros(steps)
    for j in range(steps):
        w = _damped(prob, Q[j])
        if j > 0:
            w = w - betas[j - 1] * Q[j - 1]
        alphas[j] = prob.dot(Q[j], w)
        w = w - alphas[j] * Q[j]
        w = w - Q[: j + 1].T @ prob.reduce(Q[: j + 1] @ w)
        beta = prob.dot(w, w).clamp_min(0).sqrt()
        alive = beta > floor
        betas[j] = torch.where(alive, beta, 0)
        Q[j + 1] = torch.where(alive, w / torch.where(alive, beta, 1), 0)
    # Row j is valid while every β before it is nonzero (the space did not close earlier).
    alive_rows = torch.cat([(beta0 > floor).reshape(1), betas[:-1] > 0]) if steps else betas > 0
    valid = torch.cumprod(alive_rows.to(torch.int64), 0).bool()
    T = b.new_zeros((steps + 1, steps), dtype=torch.float64)
    idx = torch.arange(steps, device=b.device)
    T[idx, idx] = alphas.to(torch.float64)
    T[idx + 1, idx] = betas.to(torch.float64)
    T[idx[:-1], idx[:-1] + 1] = betas[:-1].to(torch.float64)
    off = torch.cat([betas[:-1], betas.new_zeros(1)]) if steps else betas
    return Q, T, lanczos_tridiagonal(alphas, off, valid), beta0


def neumann_solve(
    matvec: Callable[[Vector], Vector],
    b: Vector,
    *,
    iters: int,
    damping: float = 0.0,
    scale: float = 1.0,
    step: float | None = None,
    lanczos_steps: int = LANCZOS_STEPS,
    strict: bool = False,
    allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    workspace: Workspace | None = None,
) -> SolveResult:
    """Truncated Neumann series for ``(scale·A + damping·I)⁻¹ b``, with a step that converges.

    ``x_K = η Σ_{k<K} (I − η M)^k b`` with ``M = scale·A + damping·I`` and ``K = iters`` terms: the
    Richardson iteration ``x ← x + η (b − M x)`` from ``x = 0``. For symmetric ``M`` it converges
    iff
    every eigenvalue ``μ`` of ``M`` that ``b`` touches has ``0 < η μ < 2``. The classic choice
    ``η = 1`` for BiSSL's ``I + H/(λ+damp)`` therefore needs ``‖H‖ < λ + damp``; above that the top
    direction grows like ``(‖H‖/(λ+damp))^K`` (at ``λ_max(H) ≈ 80``, ``λ + damp ≈ 10``: ``7^K``).

    **The step** (``step=None``) is ``η = 1/ritz_max``, the largest Ritz value of ``M`` on the
    Krylov space of ``b`` built by :func:`_lanczos`. The series only ever applies polynomials of
    ``M`` to ``b``, so only eigen-directions present in that Krylov space matter, and the Lanczos
    estimate of ``λ_max`` converges fastest exactly for outlying top eigenvalues. Ritz values are
    inner estimates (``ritz_max ≤ λ_max``); the step still converges while ``λ_max < 2·ritz_max``,
    which a handful of Lanczos steps from ``b`` meets unless ``b`` is nearly orthogonal to the top
    eigenvectors (then their growth starts from a tiny component). The price of a safe step is
    speed: the error along an eigenvalue ``μ`` shrinks by ``1 − μ/ritz_max`` per term, so a system
    of condition ``κ`` needs about ``κ`` terms, as for any Richardson iteration. With one term
    (no matvec) there is no estimate and ``η = 1/damping`` (or 1), i.e. ``x = b/damping``.

    **Cost.** No matvec beyond the plain series: the first ``m = min(iters − 1, lanczos_steps, P)``
    matvecs are Lanczos steps, and the first ``m + 1`` terms of the series are evaluated in the
    Lanczos basis (``M Q_m = Q_{m+1} T̃``: exact up to rounding), the remaining ``iters − 1 − m``
    terms as plain Richardson updates. In all ``iters − 1`` matvecs, as before. Extra: ``m + 1``
    stored vectors of size P, ``O(m²P)`` for reorthogonalisation, and one ``m × m`` ``eigvalsh``
    (it synchronises on CUDA).

    Args:
        step: η; None chooses ``1/ritz_max`` as above. An explicit step is used as given; with
            ``strict`` it raises :class:`SolverError` when ``η·ritz_max ≥ 2`` (the series diverges
            along the top Ritz direction).
        lanczos_steps: most Lanczos steps (and stored basis vectors beyond the first).
        others: as :func:`~bissl.solvers.cg_solve` (fixed number of terms, no tolerance, no host
            sync beyond the Ritz ``eigvalsh``; ``allreduce`` for a partitioned ``b``; ``workspace``
            holds ``b``'s copy, the Lanczos basis and the matvec's output across calls).

    Returns:
        :class:`~bissl.solvers.SolveResult` with the Lanczos ``tridiagonal`` (``ritz_min``,
        ``ritz_max``; ``indefinite`` when a Ritz value is ``≤ 0``: no positive step converges
        then). ``residual_norm`` is ``‖b − M x‖`` of the iterate *before* the last update (the last
        residual the recursion computes; no extra matvec); ``converged`` means round-off level.

    Raises:
        ValueError: ``iters`` negative, ``step`` not positive, ``lanczos_steps`` negative.
        SolverError: with ``strict``: NaN/Inf, an indefinite system, or a divergent explicit step.
    """
    _check_iters(iters, "neumann_solve")
    if not isinstance(lanczos_steps, int) or lanczos_steps < 0:
        raise ValueError(f"neumann_solve: lanczos_steps must be a non-negative int, got {lanczos_steps!r}")
    if step is not None and not step > 0:
        raise ValueError(f"neumann_solve: step must be positive, got {step}")
    prob = linear_problem(matvec, b, scale, damping, "neumann_solve", allreduce=allreduce, workspace=workspace)
    # More Lanczos steps than dimensions only adds round-off vectors. A partition's own size says
    # nothing about the whole vector's, and every rank must take the same number of steps (each
    # one all-reduces), so partitioned problems rely on the β = 0 breakdown path instead.
    m = max(0, min(iters - 1, lanczos_steps, prob.b.numel() if allreduce is None else lanczos_steps))
    Q, T, tri, beta0 = _lanczos(prob, m)
    default = 1.0 / prob.shift if prob.shift > 0 else 1.0
    if step is not None:
        eta = torch.tensor(float(step), dtype=torch.float64, device=prob.b.device)
    elif m == 0:
        eta = torch.tensor(default, dtype=torch.float64, device=prob.b.device)
    else:
        top = tri.ritz_extremes()[1].to(torch.float64)
        usable = torch.isfinite(top) & (top > 0)
        eta = torch.where(usable, 1 / torch.where(usable, top, 1), default)
    # Terms 1..m+1 in the Lanczos basis: y holds the coordinates of x in Q (support grows by one).
    coord_terms = min(iters, m + 1)
    y = T.new_zeros(m + 1)
    rhs = T.new_zeros(m + 1)
    rhs[0] = beta0.to(torch.float64)
    r_coord = rhs
    for _ in range(coord_terms):
        r_coord = rhs - T @ y[:m]
        y = y + eta * r_coord
    x = (y.to(prob.b.dtype) @ Q).contiguous()
    rr = (r_coord @ r_coord).to(prob.b.dtype)  # Q is orthonormal: coordinate norm = vector norm
    for _ in range(iters - coord_terms):
        r = prob.b - _damped(prob, x)
        x.add_(eta.to(x.dtype) * r)
        rr = prob.dot(r, r)
    bb = prob.dot(prob.b, prob.b)
    prob.finish()
    nonfinite = prob.any_nonfinite(x) | ~torch.isfinite(rr)
    zero = torch.zeros((), dtype=torch.bool, device=x.device)
    result = SolveResult(
        x=prob.views(x),
        iters=torch.tensor(iters, device=x.device),
        residual_norm=rr.sqrt(),
        b_norm=bb.sqrt(),
        converged=(rr <= _tolerance2(bb, None, 0.0)) & ~nonfinite,
        negative_curvature=zero,
        nonfinite=nonfinite,
        method="neumann",
        tridiagonal=tri if m else None,
    )
    if strict:
        result.check()
        top_ritz = float(result.ritz_max) if m > 0 else float("nan")
        if step is not None and m > 0 and step * top_ritz >= 2:
            raise SolverError(
                f"neumann: step {float(step):.4g} times the largest Ritz value {top_ritz:.4g} of the "
                f"damped operator is >= 2, so the series diverges; use step=None "
                f"(η = 1/ritz_max) or a step below {2 / top_ritz:.4g}"
            )
    return result


def identity_solve(
    matvec: Callable[[Vector], Vector] | None,
    b: Vector,
    *,
    iters: int = 0,
    damping: float = 0.0,
    scale: float = 1.0,
    strict: bool = False,
    allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    workspace: Workspace | None = None,
) -> SolveResult:
    """First-order approximation: ignore ``A``, ``x = b / damping`` (``x = b`` when ``damping`` is 0).

    For BiSSL's ``(I + H/(λ+damp)) x = v`` (``damping = 1``) this is ``x = v``: ``dθ*/dφ ≈ I``.
    No matvec is made; ``matvec`` and ``iters`` are accepted for a uniform solver signature.
    ``residual_norm`` is not computed (NaN) because that would need a matvec. ``workspace`` is
    accepted for the uniform signature and unused: the answer is the solver's only buffer.
    """
    del workspace  # the answer takes b's copy, and an answer never lives in a workspace
    prob = linear_problem(matvec, b, scale, damping, "identity_solve", allreduce=allreduce)
    b_norm = prob.norm(prob.b)
    # prob.b is the solver's own copy of b: x may take its storage.
    x = prob.b.div_(prob.shift) if prob.shift > 0 else prob.b
    zero = torch.zeros((), dtype=torch.bool, device=x.device)
    nonfinite = prob.any_nonfinite(x)
    result = SolveResult(
        x=prob.views(x),
        iters=torch.zeros((), dtype=torch.int64, device=x.device),
        residual_norm=torch.full((), float("nan"), dtype=x.dtype, device=x.device),
        b_norm=b_norm,
        converged=zero,
        negative_curvature=zero,
        nonfinite=nonfinite,
        method="identity",
        needs_positive_definite=False,
    )
    return result.check() if strict else result
