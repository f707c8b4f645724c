"""The IFT term of BiSSL's hypergradient, data-parallel (and optionally sharded).

Each rank evaluates the lower and upper losses on its own batch shard (with SyncBatchNorm or
gathered negatives, the losses themselves contain collectives; every rank then runs the same
graphs). The right-hand side ``v = ∇_θ L_D(θ)`` and every HVP are averaged across ranks, so the
solver sees the operator and right-hand side of the rank-averaged loss. Its scalars (α, β, the
stopping test, the indefiniteness flags and Ritz values) come from averaged vectors only and are
therefore bit-identical on every rank, as is the answer ``x``: every rank takes the same branch of
the ``on_indefinite`` policy and issues the same collectives.

Unsharded (default), every rank holds the full vectors and averages each HVP with one flat
all-reduce. Sharded (``shard=True``; the trainer's default under ZeRO-3), each rank keeps only its
partition of CG's vectors and of the right-hand side (:class:`bissl.distributed.shard.ShardLayout`):
the HVP runs on the full (gathered) θ, its result is reduce-scattered into the partition, and each
dot product is one all-reduce of partial sums. The answer is all-gathered once at the end.

Only these reductions are new here: they are hooks of the core's :func:`implicit_hypergrad`, which
does everything else (upper gradient, linearisation, solve, indefiniteness policy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import Tensor

from bissl.distributed.collectives import ProcessGroup, allreduce_mean_
from bissl.distributed.matvec import DistributedMatVec, MatVecHook
from bissl.hypergrad.implicit import LamLike, VectorSpace, implicit_hypergrad
from bissl.hypergrad.settings import HypergradSettings
from bissl.ops.flat import FlatSpec
from bissl.solvers.result import SolveResult
from bissl.solvers.workspace import Workspace
from bissl.typing import LossFn, Params, ParamsLike


def distributed_implicit_hypergrad(
    lower_loss: LossFn,
    upper_loss: LossFn,
    lower_params: ParamsLike,
    *,
    lam: LamLike,
    settings: HypergradSettings | None = None,
    shard: bool = False,
    return_info: bool = False,
    group: ProcessGroup | None = None,
    bucket_numel: int | None = None,
    on_matvec: MatVecHook | None = None,
    on_rhs: Callable[[Tensor], None] | None = None,
    workspace: Workspace | None = None,
) -> Params | tuple[Params, SolveResult]:
    """``x = (I + H/(λ + damping))⁻¹ v`` with ``H`` and ``v`` averaged over the ranks of ``group``.

    Args:
        lower_loss, upper_loss: this rank's losses (see :func:`bissl.hypergrad.implicit_hypergrad`).
        lower_params: the full ``θ``, identical on every rank (under ZeRO-3, gathered).
        lam: proximal weight λ > 0.
        settings: how to solve (default: :class:`HypergradSettings()`).
        shard: keep only this rank's partition of the solver's vectors (see module docstring).
        return_info: also return the :class:`~bissl.solvers.SolveResult`.
        group: process group (default: the world; without torch.distributed, a single rank).
        bucket_numel: bucket size of the flat all-reduces (default: one collective per vector).
        on_matvec: hook ``(p, Hp_averaged) -> None`` after every averaged HVP (unsharded; tracing).
        on_rhs: hook called once with the full rank-averaged right-hand side ``v`` (flat ``(P,)``).
        workspace: the solver's work buffers, kept across calls (:class:`~bissl.solvers.Workspace`).

    Returns:
        ``x`` as a dict keyed like ``lower_params``, bit-identical on every rank; with
        ``return_info`` also the :class:`~bissl.solvers.SolveResult`, with an extra attribute
        ``num_collectives`` (unsharded: 1 for ``v`` plus 1 per HVP without buckets).
    """
    settings = settings or HypergradSettings()
    space: VectorSpace
    if shard:
        from bissl.distributed.shard import sharded_space

        space = sharded_space(lower_params, group=group, on_rhs=on_rhs)
    else:
        space = RankAveraged(group=group, bucket_numel=bucket_numel, on_matvec=on_matvec, on_rhs=on_rhs)
    # The flags come from averaged vectors, so every rank takes the same branch of the policy.
    x, result = cast(
        tuple[Params, SolveResult],  # return_info=True; x in lower_params' form: a dict
        implicit_hypergrad(
            lower_loss,
            upper_loss,
            lower_params,
            lam=lam,
            **settings.kwargs(),
            return_info=True,
            space=space,
            workspace=workspace,
        ),
    )
    if isinstance(space, RankAveraged):
        result.num_collectives = space.num_collectives
    return (x, result) if return_info else x


class RankAveraged:
    """Whole vectors on every rank, the right-hand side and each HVP averaged across ranks (one
    flat, optionally bucketed, all-reduce each): the :class:`~bissl.hypergrad.implicit.VectorSpace`
    of the unsharded data-parallel solve."""

    allreduce = None  # the vectors are whole: dots need no reduction

    def __init__(
        self,
        *,
        group: ProcessGroup | None = None,
        bucket_numel: int | None = None,
        on_matvec: MatVecHook | None = None,
        on_rhs: Callable[[Tensor], None] | None = None,
    ) -> None:
        self.group, self.bucket_numel, self.on_matvec, self.on_rhs = group, bucket_numel, on_matvec, on_rhs
        self._rhs_collectives = 0
        self._matvecs: list[DistributedMatVec] = []

    @property
    def num_collectives(self) -> int:
        """Collectives issued so far (1 for ``v`` plus 1 per HVP without buckets)."""
        return self._rhs_collectives + sum(m.num_collectives for m in self._matvecs)

    def rhs(self, v: Tensor) -> Tensor:
        self._rhs_collectives += allreduce_mean_(v, group=self.group, bucket_numel=self.bucket_numel)
        if self.on_rhs is not None:
            self.on_rhs(v.clone())
        return v

    def operator(self, matvec: Callable[[Tensor], Tensor]) -> DistributedMatVec:
        self._matvecs.append(
            DistributedMatVec(matvec, group=self.group, bucket_numel=self.bucket_numel, on_matvec=self.on_matvec)
        )
        return self._matvecs[-1]

    def solution(self, x: Tensor) -> Tensor:
        return x

    def segments(self, spec: FlatSpec) -> Tensor:
        return spec.segment_ids()
