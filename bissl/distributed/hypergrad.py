"""The IFT term of BiSSL's hypergradient, data-parallel.

Each rank evaluates the lower and upper losses on its own batch shard. The right-hand side
``v = ∇_θ L_D(θ)`` and every HVP are averaged across ranks with one flat collective each, so the
solver sees the operator and right-hand side of the shard-averaged losses. Its scalars (α, β, the
stopping test, the indefiniteness flags and Ritz values) come from averaged vectors only and are
therefore bit-identical on every rank, as is the answer ``x``: every rank takes the same branch of
the ``on_indefinite`` policy and issues the same collectives.

Only the two reductions are new here: they are hooks of the core's :func:`implicit_hypergrad`,
which does everything else (upper gradient, linearisation, solve, indefiniteness policy).
"""
from __future__ import annotations

from bissl.distributed.collectives import ProcessGroup, allreduce_mean_
from bissl.distributed.matvec import DistributedMatVec, MatVecHook
from bissl.hypergrad.implicit import IndefinitePolicy, SolverName, implicit_hypergrad
from bissl.ops.hvp import HVPMode
from bissl.solvers.result import SolveResult
from bissl.typing import LossFn, Params, ParamsLike


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
    counts = {"rhs": 0}
    wrapped: list[DistributedMatVec] = []

    def reduce_rhs(v):
        counts["rhs"] += allreduce_mean_(v, group=group, bucket_numel=bucket_numel)

    def wrap_matvec(matvec):
        wrapped.append(DistributedMatVec(matvec, group=group, bucket_numel=bucket_numel, on_matvec=on_matvec))
        return wrapped[-1]

    # The flags come from averaged vectors, so every rank takes the same branch of the policy.
    x, result = implicit_hypergrad(
        lower_loss, upper_loss, lower_params, lam=lam, iters=iters, damping=damping, solver=solver,
        hvp_mode=hvp_mode, backend=backend, strict=strict, on_indefinite=on_indefinite,
        fallback=fallback, rtol=rtol, return_info=True, reduce_rhs=reduce_rhs, wrap_matvec=wrap_matvec)
    result.num_collectives = counts["rhs"] + sum(m.num_collectives for m in wrapped)
    return (x, result) if return_info else x
