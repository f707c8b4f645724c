"""The IFT term of BiSSL's hypergradient, data-parallel.

Each rank evaluates the lower and upper losses on its own batch shard. The right-hand side
``v = ∇_θ L_D(θ)`` and every HVP are averaged across ranks with one flat collective each, so the
solver sees the operator and right-hand side of the shard-averaged losses. Its scalars (α, β, the
stopping test, the indefiniteness flags and Ritz values) come from averaged vectors only and are
therefore bit-identical on every rank, as is the answer ``x``: every rank takes the same branch of
the ``on_indefinite`` policy and issues the same collectives.

Only the two reductions are new here; the rest is the core's code (``upper_gradient``,
``linearize_hvp``, the solve and the indefiniteness policy of :mod:`bissl.hypergrad.implicit`).
"""
from __future__ import annotations

from bissl.distributed.collectives import ProcessGroup, allreduce_mean_
from bissl.distributed.matvec import DistributedMatVec, MatVecHook
from bissl.hypergrad.implicit import (
    ON_INDEFINITE,
    IndefinitePolicy,
    SolverName,
    _apply_policy,
    _solve,
    upper_gradient,
)
from bissl.ops.flat import flat_spec, unflatten
from bissl.ops.hvp import HVPMode, linearize_hvp
from bissl.solvers import get_solver
from bissl.solvers.result import SolveResult
from bissl.typing import LossFn, Params, ParamsLike


class _AveragedOperator:
    """What the core's ``_solve`` reads from a linearised HVP: ``.matvec``, here rank-averaged."""

    def __init__(self, matvec: DistributedMatVec) -> None:
        self.matvec = matvec


def distributed_implicit_hypergrad(
    lower_loss: LossFn,
    upper_loss: LossFn,
    lower_params: ParamsLike,
    *,
    lam: float,
    iters: int = 5,
    damping: float = 0.0,
    solver: SolverName = "cg",
    hvp_mode: HVPMode = "revrev",
    backend: str | None = None,
    strict: bool = True,
    on_indefinite: IndefinitePolicy = "raise",
    fallback: SolverName = "minres",
    rtol: float | None = None,
    return_info: bool = False,
    group: ProcessGroup | None = None,
    bucket_numel: int | None = None,
    on_matvec: MatVecHook | None = None,
) -> Params | tuple[Params, SolveResult]:
    """``x = (I + H/(λ + damping))⁻¹ v`` with ``H`` and ``v`` averaged over the ranks of ``group``.

    Arguments as :func:`bissl.hypergrad.implicit_hypergrad`, where ``lower_loss`` and
    ``upper_loss`` are this rank's shard losses and ``lower_params`` is the full ``θ``, identical on
    every rank (under ZeRO-3, gathered). Extra arguments:

    Args:
        group: process group (default: the world; without torch.distributed, a single rank).
        bucket_numel: bucket size of the flat all-reduces (default: one collective per vector).
        on_matvec: hook ``(p, Hp_averaged) -> None`` after every averaged HVP (tracing, tests).

    Returns:
        ``x`` as a dict keyed like ``lower_params``, bit-identical on every rank; with
        ``return_info`` also the :class:`~bissl.solvers.SolveResult`, with an extra attribute
        ``num_collectives`` (1 for ``v`` plus 1 per HVP without buckets).
    """
    if not lam > 0:
        raise ValueError(f"distributed_implicit_hypergrad: lam must be > 0, got {lam}")
    if damping < 0:
        raise ValueError(f"distributed_implicit_hypergrad: damping must be >= 0, got {damping}")
    if on_indefinite not in ON_INDEFINITE:
        raise ValueError(f"distributed_implicit_hypergrad: unknown on_indefinite {on_indefinite!r}; "
                         f"choose one of {ON_INDEFINITE}")
    get_solver(solver)
    get_solver(fallback)
    if on_indefinite == "fallback" and fallback == solver:
        raise ValueError(f"distributed_implicit_hypergrad: fallback solver must differ from solver ({solver!r})")
    spec = flat_spec(lower_params)
    _, v = upper_gradient(upper_loss, lower_params)
    v_collectives = allreduce_mean_(v, group=group, bucket_numel=bucket_numel)
    matvec = None
    op = None
    if solver != "identity":
        local = linearize_hvp(lower_loss, lower_params, mode=hvp_mode)
        matvec = DistributedMatVec(local.matvec, group=group, bucket_numel=bucket_numel, on_matvec=on_matvec)
        op = _AveragedOperator(matvec)

    def solve(name: str, damp: float) -> SolveResult:
        if op is None and name != "identity":
            raise ValueError(f"distributed_implicit_hypergrad: no Hessian for solver {name!r}")
        return _solve(name, op, v, spec, lam=lam, damping=damp, iters=iters, backend=backend, rtol=rtol)

    result = solve(solver, damping)
    # Flags are identical on every rank, so every rank makes the same policy decision.
    acting = strict or on_indefinite != "raise"
    if acting and result.needs_positive_definite and bool(result.indefinite):
        result = _apply_policy(result, on_indefinite, fallback, solver, lam, damping, solve, strict)
    if strict:
        result.check(ignore_indefinite=result.action == "warned")
    x = unflatten(result.x, spec)
    result.x = x
    result.num_collectives = v_collectives + (matvec.num_collectives if matvec is not None else 0)
    return (x, result) if return_info else x
