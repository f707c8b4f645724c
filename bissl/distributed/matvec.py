"""Data-parallel matvec: each rank applies its own operator, the results are averaged.

With the HVP batch split across ranks, rank ``r`` holds ``H_r`` (the Hessian of its shard's loss)
and ``(1/N) Σ_r H_r v`` is the Hessian of the shard-averaged loss, the data-parallel ``H``. One
flat all-reduce per matvec (:func:`bissl.distributed.collectives.allreduce_mean_`) replaces the
reference's one all-reduce per parameter tensor per HVP.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from bissl.distributed.collectives import ProcessGroup, allreduce_mean_
from bissl.typing import MatVec

#: Called after each averaged matvec with ``(v, Av)`` (both flat); for tracing and tests.
MatVecHook = Callable[[Tensor, Tensor], None]


class DistributedMatVec:
    """``v ↦ mean over ranks of matvec_r(v)`` on flat ``(P,)`` vectors.

    Every rank must call it the same number of times with the same ``v`` (true inside CG, whose
    inputs are built from averaged vectors only).

    Args:
        matvec: the rank-local ``(P,) -> (P,)`` operator, e.g. ``linearize_hvp(...).matvec``.
        group: process group (default: the world).
        bucket_numel: see :func:`~bissl.distributed.collectives.allreduce_mean_` (default: one
            collective over the whole vector).
        on_matvec: optional hook ``(v, Av) -> None`` run after the reduction.

    Attributes:
        num_matvecs: calls so far; ``num_collectives``: collectives issued so far.
    """

    def __init__(
        self,
        matvec: MatVec,
        *,
        group: ProcessGroup | None = None,
        bucket_numel: int | None = None,
        on_matvec: MatVecHook | None = None,
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"DistributedMatVec: matvec must be callable, got {type(matvec).__name__}")
        self.matvec = matvec
        self.group = group
        self.bucket_numel = bucket_numel
        self.on_matvec = on_matvec
        self.num_matvecs = 0
        self.num_collectives = 0

    def __call__(self, v: Tensor) -> Tensor:
        out = self.matvec(v)
        if not isinstance(out, Tensor) or out.shape != v.shape:
            raise ValueError(
                f"DistributedMatVec: the local matvec returned "
                f"{getattr(out, 'shape', type(out))}, expected {tuple(v.shape)}"
            )
        # The reduction is in place: never let it write into the caller's v.
        if out.data_ptr() == v.data_ptr() or not out.is_contiguous():
            out = out.clone()
        self.num_collectives += allreduce_mean_(out, group=self.group, bucket_numel=self.bucket_numel)
        self.num_matvecs += 1
        if self.on_matvec is not None:
            self.on_matvec(v, out)
        return out
