"""Shared set-up of a linear problem: dict or flat right-hand side, matvec on the same kind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from bissl.ops.flat import FlatSpec, flat_spec, flatten, unflatten
from bissl.ops.reference import dot_ref
from bissl.typing import Vector

#: Sums a tensor of partial dot products over the partitions of a vector (an all-reduce across
#: ranks when each rank holds one partition; see :mod:`bissl.distributed.shard`).
AllReduce = Callable[[Tensor], Tensor]


@dataclass
class FlatProblem:
    """``(scale·A + shift·I) x = b`` on flat ``(P,)`` vectors.

    Attributes:
        matvec: flat ``A`` (before scale/shift).
        b: flat right-hand side.
        spec: layout when ``b`` came as a dict, else None.
        scale, shift: of the damped operator.
        allreduce: sums partial dots when the vectors are partitions (None: they are whole).
    """

    matvec: Callable[[Tensor], Tensor]
    b: Tensor
    spec: FlatSpec | None
    scale: float
    shift: float
    allreduce: AllReduce | None = None

    def reduce(self, partial: Tensor) -> Tensor:
        """A dot product (or a tensor of them) from this partition's share."""
        return partial if self.allreduce is None else self.allreduce(partial)

    def dot(self, u: Tensor, v: Tensor) -> Tensor:
        """``uᵀv`` of the whole vectors (float64-accumulated, :func:`bissl.ops.reference.dot_ref`)."""
        return self.reduce(dot_ref(u, v))

    def any_nonfinite(self, u: Tensor) -> Tensor:
        """Whether any entry of the whole vector is NaN or Inf (0-dim bool)."""
        bad = ~torch.isfinite(u).all()
        return bad if self.allreduce is None else self.allreduce(bad.to(u.dtype)) > 0

    def norm(self, u: Tensor) -> Tensor:
        """``‖u‖`` of the whole vector."""
        if self.allreduce is None:
            return torch.linalg.vector_norm(u)
        return self.dot(u, u).clamp_min(0).sqrt()

    def to_user(self, x: Tensor) -> Vector:
        """Return ``x`` in the caller's form (dict of views if ``b`` was a dict)."""
        return x if self.spec is None else unflatten(x, self.spec)

    def from_user(self, v: Vector, what: str) -> Tensor:
        if self.spec is None:
            if not isinstance(v, Tensor) or v.shape != self.b.shape:
                raise ValueError(f"{what} must be a tensor of shape {tuple(self.b.shape)} like b")
            return v
        if isinstance(v, Tensor):
            raise ValueError(f"{what} must be a dict like b")
        return flatten(v, self.spec)


def flat_problem(matvec: Callable, b: Vector, scale: float, shift: float, where: str,
                 allreduce: AllReduce | None = None) -> FlatProblem:
    """Validate and flatten. ``matvec`` takes and returns the kind of ``b`` (dict or flat);
    ``allreduce``: see :class:`FlatProblem` (flat partitions only)."""
    if allreduce is not None and not isinstance(b, Tensor):
        raise ValueError(f"{where}: allreduce needs a flat partition b, not a dict")
    if not (isinstance(scale, (int, float)) and isinstance(shift, (int, float))):
        raise TypeError(f"{where}: scale and damping must be Python numbers")
    if isinstance(b, Tensor):
        if b.dim() != 1:
            raise ValueError(f"{where}: a tensor b must be flat (P,), got shape {tuple(b.shape)}; pass a dict for shaped parameters")
        if not b.is_floating_point():
            raise TypeError(f"{where}: b must be floating point, got {b.dtype}")
        bf = b.detach().contiguous()

        def mv(v: Tensor) -> Tensor:
            out = matvec(v)
            if not isinstance(out, Tensor) or out.shape != v.shape:
                raise ValueError(f"{where}: matvec returned {getattr(out, 'shape', type(out))}, expected {tuple(v.shape)}")
            return out.detach()

        return FlatProblem(mv, bf, None, float(scale), float(shift), allreduce)
    spec = flat_spec(b)
    if not spec.dtype.is_floating_point:
        raise TypeError(f"{where}: b must be floating point, got {spec.dtype}")
    bf = flatten({k: t.detach() for k, t in b.items()}, spec)
    if bf.data_ptr() == next(iter(b.values())).data_ptr():
        bf = bf.clone()  # never alias the caller's storage: the solver writes into its vectors

    def mv_dict(v: Tensor) -> Tensor:
        out = matvec(unflatten(v, spec))
        if isinstance(out, Tensor):
            raise ValueError(f"{where}: b is a dict, so matvec must return a dict too")
        return flatten({k: t.detach() for k, t in out.items()}, spec)

    return FlatProblem(mv_dict, bf, spec, float(scale), float(shift))


def tiny(dtype: torch.dtype) -> float:
    """A squared-residual floor below which the residual is round-off (avoids 0/0 after convergence)."""
    return float(torch.finfo(dtype).tiny) ** 0.5
