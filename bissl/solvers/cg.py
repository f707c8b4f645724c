"""Conjugate gradients for ``(scale·A + damping·I) x = b`` with a matrix-free ``A``.

Two variants:

* :func:`cg_solve` — standard (global) CG [Hestenes & Stiefel 1952; Shewchuk, "An Introduction to
  the Conjugate Gradient Method Without the Agonizing Pain", §B2]. Our default.
* :func:`cg_layerwise_solve` — one α and β per parameter tensor with the matvec computed jointly,
  what the BiSSL reference code runs by default. It is **not** a convergent method (it can stall or
  diverge; ``docs/method.md`` §3): offered for fidelity to the reference only.

Fixed-iteration mode (``rtol=None``) makes **no host synchronisation**: step sizes, flags and
counters stay 0-dim device tensors and every branch is a ``torch.where``. With a tolerance, the
loop reads one flag per iteration to stop early. The vector updates run through the fused ops of
the chosen backend (:func:`bissl.ops._backends.cg_vector_ops`) on flat buffers allocated once per
solve, whatever form ``b`` and the matvec's result take (dict, tuple/list, flat:
:mod:`bissl.solvers._problem`); the matvec is fed views of the solver's buffer, no copies.

Breakdown handling: an iteration is skipped (α = β = 0, ``x`` frozen) once the residual reaches
round-off (converged — later iterations keep the answer instead of producing 0/0), when
``pᵀAp ≤ 0`` (flag ``negative_curvature``) or when a value is NaN/Inf (flag ``nonfinite``).
Nothing is silently zeroed: the flags are in the :class:`SolveResult`, and ``strict=True`` raises.

Spectrum estimates for free: :func:`cg_solve`'s α/β (plus ``pᵀAp/rᵀr`` of a direction that broke it)
are the Lanczos tridiagonal of the damped operator (:mod:`bissl.solvers.lanczos`), so the result
carries Ritz estimates ``ritz_min``/``ritz_max``/``condition_estimate`` and the flag ``indefinite``
without any extra matvec; their small eigenvalue problem runs lazily, when first read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bissl.solvers._problem import linear_problem, tiny
from bissl.solvers.lanczos import cg_tridiagonal
from bissl.solvers.result import SolveResult
from bissl.solvers.workspace import Workspace
from bissl.typing import Vector


def _check_iters(iters: int, where: str) -> None:
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"{where}: iters must be a non-negative int, got {iters!r}")


def _tolerance2(b_norm2: Tensor, rtol: float | None, atol: float) -> Tensor:
    """Squared residual threshold: max(rtol·‖b‖, atol)², at least round-off level."""
    floor = (64 * torch.finfo(b_norm2.dtype).eps) ** 2 * b_norm2 + tiny(b_norm2.dtype)
    if rtol is None and atol == 0.0:
        return floor
    target = torch.clamp_min((rtol or 0.0) ** 2 * b_norm2, atol**2)
    return torch.maximum(target, floor)


def cg_solve(
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
    """Solve ``(scale·A + damping·I) x = b`` by conjugate gradients.

    Args:
        matvec: ``v ↦ A v`` for symmetric ``A``. It is given ``v`` in ``b``'s form, as views of the
            solver's buffer (zero-copy; it must not modify them), and may return a dict, a
            tuple/list of tensors or a flat ``(P,)`` tensor laid out like ``b``.
        b: right-hand side: a ``{name: Tensor}`` dict, a tuple/list of tensors or a flat ``(P,)``
            tensor (one dtype and device).
        iters: number of iterations (the maximum when ``rtol``/``atol`` is given). One matvec each.
        damping: ``shift`` added to the diagonal (default: 0.0).
        scale: multiplies ``A`` (default: 1.0); BiSSL solves ``(I + H/(λ+damp)) x = v`` as
            ``scale = 1/(λ+damp)``, ``damping = 1`` so the scaling is fused into the matvec epilogue.
        rtol, atol: stop when ``‖r‖ ≤ max(rtol·‖b‖, atol)`` (one host sync per iteration). With
            neither given (default) exactly ``iters`` iterations run with zero host syncs.
        x0: initial guess in any form laid out like ``b`` (default: zeros, as the reference).
        strict: raise :class:`~bissl.solvers.SolverError` on negative curvature, NaN/Inf, or (when a
            tolerance was given) non-convergence (default: False — read ``result.problems()``).
        backend: vector-op backend (``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"``, ``"cuda"``;
            default: ``BISSL_BACKEND`` or auto).
        allreduce: for a flat ``b`` that is one rank's partition of the vector (sharded CG):
            sums a tensor of partial dot products across ranks (one all-reduce per dot; the
            matvec maps partitions to partitions). Every scalar, hence every branch, is then
            identical on all ranks. Default: the vectors are whole.
        workspace: a :class:`~bissl.solvers.Workspace` holding the work buffers (``b``'s copy, the
            direction, the matvec's output) across calls: on CPU, repeated solves of a large
            problem then skip the page faults of fresh buffers. Default: allocated per solve.

    Returns:
        :class:`~bissl.solvers.SolveResult` with ``x`` in ``b``'s form (views of one flat buffer)
        and the Lanczos tridiagonal of ``scale·A + damping·I``: ``ritz_min ≥ λ_min``,
        ``ritz_max ≤ λ_max``, ``condition_estimate ≤ κ`` (lazy, no extra matvec), ``indefinite``
        when ``pᵀAp ≤ 0`` was met or a Ritz value is ``≤ 0``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> res = cg_solve(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), iters=2)
        >>> res.x   # exact after n = 2 iterations
        tensor([0.0909, 0.6364], dtype=torch.float64)
    """
    _check_iters(iters, "cg_solve")
    prob = linear_problem(matvec, b, scale, damping, "cg_solve", backend, allreduce, workspace)
    ops = prob.ops
    use_tol = rtol is not None or atol > 0.0
    bb = prob.dot(prob.b, prob.b)
    tol2 = _tolerance2(bb, rtol, atol)

    ap = prob.empty("ap")  # the damped matvec's output, reused every iteration
    if x0 is None:
        x = torch.zeros_like(prob.b)
        r = prob.b  # the problem's own copy of b: the residual overwrites it
    else:
        x = prob.from_user(x0, "cg_solve: x0")
        ax, _ = prob.apply(x, ap)
        r = prob.b.sub_(ax)
    p = prob.copy_of("p", r)
    rr = prob.dot(r, r)

    zero = torch.zeros((), dtype=torch.bool, device=x.device)
    active = torch.ones((), dtype=torch.bool, device=x.device)
    negative, nonfinite = zero.clone(), zero.clone()
    n_iters = torch.zeros((), dtype=torch.int64, device=x.device)
    # pᵀAp/rᵀr of the direction that broke CG (NaN if none): the last row of the Lanczos tridiagonal.
    breakdown_curvature = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    alphas, betas = [], []
    for _ in range(iters):
        if use_tol and not bool(active & (rr > tol2)):
            break
        ap, pap = prob.apply(p, ap)
        done = rr <= tol2
        bad_value = ~(torch.isfinite(pap) & torch.isfinite(rr))
        bad_curv = (pap <= 0) & ~done & ~bad_value
        breaking = bad_curv & active
        breakdown_curvature = torch.where(breaking, pap / torch.where(breaking, rr, 1), breakdown_curvature)
        nonfinite |= bad_value & active
        negative |= breaking
        active = active & ~done & ~bad_value & ~bad_curv
        alpha = torch.where(active, rr / torch.where(active, pap, 1), 0)
        rr_new = prob.reduce(ops.cg_step_(x, r, p, ap, alpha))
        bad_new = ~torch.isfinite(rr_new) & active
        nonfinite |= bad_new
        active = active & ~bad_new
        beta = torch.where(active, rr_new / torch.where(active, rr, 1), 0)
        ops.cg_direction_(p, r, beta)
        n_iters += active.to(torch.int64)
        rr = torch.where(active, rr_new, rr)
        alphas.append(alpha)
        betas.append(beta)
    prob.finish()

    res_norm = rr.sqrt()
    stacked = (torch.stack(alphas), torch.stack(betas)) if alphas else (x.new_zeros(0), x.new_zeros(0))
    result = SolveResult(
        x=prob.views(x),
        iters=n_iters,
        residual_norm=res_norm,
        b_norm=bb.sqrt(),
        converged=(rr <= tol2) & ~nonfinite,
        negative_curvature=negative,
        nonfinite=nonfinite,
        alphas=stacked[0],
        betas=stacked[1],
        method="cg",
        tolerance_requested=use_tol,
        tridiagonal=cg_tridiagonal(stacked[0], stacked[1], breakdown_curvature),
    )
    return result.check() if strict else result


def cg_layerwise_solve(
    matvec: Callable[[Vector], Vector],
    b: Vector,
    *,
    iters: int,
    damping: float = 0.0,
    scale: float = 1.0,
    segments: Tensor | Sequence[int] | None = None,
    strict: bool = False,
    allreduce: Callable[[Tensor], Tensor] | None = None,
    workspace: Workspace | None = None,
) -> SolveResult:
    """Layer-wise CG, the BiSSL reference's default: per-tensor α, β; one joint matvec per iteration.

    Each parameter tensor ``i`` runs its own CG recurrences on its block of the residual while the
    matvec couples all blocks. Only the *global* ``pᵀAp ≤ 0`` is negative curvature; a single
    block's ``p_iᵀ(Ap)_i`` may be negative for a positive definite ``A`` (the method's known flaw),
    and such a block just skips the step (the reference's tiny-denominator guard). The per-block
    updates are the fused ``cg_step_``/``cg_direction_`` kernels on views of one flat buffer, or,
    with the ``cpp`` backend on CPU, one call for all blocks (``bissl::cg_step_blocks_`` and its
    kin), whose damped epilogue also returns the per-block ``pᵀAp``.

    Args:
        matvec, b, iters, damping, scale, strict, workspace: as :func:`cg_solve` (any form; fixed
            iterations).
        segments: blocks of a flat ``b``: their lengths, or a ``(P,)`` int64 tensor of
            non-decreasing block ids (default: a single block, i.e. global CG); ignored for a dict
            or tuple ``b`` (one block per tensor).
        allreduce: as :func:`cg_solve`; ``b`` and ``segments`` are this rank's partition, which
            must hold a (possibly empty) block of every segment, so that the per-block dots —
            all-reduced as one vector — line up across ranks.

    Returns:
        :class:`~bissl.solvers.SolveResult`; ``alphas``/``betas`` are ``(iters, n_blocks)``.
        ``residual_norm`` is the one the block recursion tracks; because the per-block steps do not
        commute with the coupled ``A`` it is *not* ``‖b − A x‖`` (compute that if you need it).
    """
    _check_iters(iters, "cg_layerwise_solve")
    prob = linear_problem(matvec, b, scale, damping, "cg_layerwise_solve", allreduce=allreduce, workspace=workspace)
    bounds = prob.segment_bounds(segments)
    n_blocks = len(bounds)
    blocks = prob.block_ops(bounds)

    x = torch.zeros_like(prob.b)
    r = prob.b
    p = prob.copy_of("p", r)
    ap = prob.empty("ap")
    rr = blocks.dots(r, r)
    bb = rr.sum()
    tol2 = _tolerance2(bb, None, 0.0)
    guard = tiny(x.dtype)
    zero = torch.zeros((), dtype=torch.bool, device=x.device)
    negative, nonfinite = zero.clone(), zero.clone()
    n_iters = torch.zeros((), dtype=torch.int64, device=x.device)
    alphas, betas = [], []
    for _ in range(iters):
        ap, pap = blocks.apply(p, ap)
        bad = ~torch.isfinite(pap).all() | ~torch.isfinite(rr).all()
        nonfinite |= bad
        negative |= (pap.sum() <= 0) & (rr.sum() > tol2) & ~bad
        step = (rr > tol2 / n_blocks) & (pap.abs() > guard) & ~nonfinite
        alpha = torch.where(step, rr / torch.where(step, pap, 1), 0)
        rr_new = blocks.step_(x, r, p, ap, alpha)
        beta = torch.where(step, rr_new / torch.where(step, rr, 1), 0)
        blocks.direction_(p, r, beta)
        n_iters += step.any().to(torch.int64)
        rr = torch.where(step, rr_new, rr)
        alphas.append(alpha)
        betas.append(beta)
    prob.finish()
    total = rr.sum()
    stacked = (
        (torch.stack(alphas), torch.stack(betas)) if alphas else (x.new_zeros(0, n_blocks), x.new_zeros(0, n_blocks))
    )
    result = SolveResult(
        x=prob.views(x),
        iters=n_iters,
        residual_norm=total.sqrt(),
        b_norm=bb.sqrt(),
        converged=(total <= tol2) & ~nonfinite,
        negative_curvature=negative,
        nonfinite=nonfinite,
        alphas=stacked[0],
        betas=stacked[1],
        method="cg_layerwise",
    )
    return result.check() if strict else result
