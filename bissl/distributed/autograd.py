"""Differentiable collectives that also run on gloo, to any order of differentiation.

``torch.distributed.nn.functional`` differentiates ``all_gather`` with a reduce-scatter, which
gloo does not implement, so the SimCLR gather and SyncBatchNorm would fail on CPU. Here both
collectives are built on ``all_reduce`` and ``all_gather`` only:

* :func:`all_reduce_sum` ``y = Σ_r x_r``. Backward: ``ḡ_r = Σ_s g_s``, the same all-reduce of the
  incoming gradient; forward mode: the all-reduce of the tangent.
* :func:`all_gather_cat` ``y = cat(x_0, …, x_{N-1})`` along ``dim``. Backward: all-reduce the
  incoming gradient, then keep this rank's slice; forward mode: gather the tangents.

Convention: every rank computes its own scalar ``L_r`` from ``y``; the gradient a rank receives is
its part of ``∇(Σ_r L_r)`` (so averaging the ranks' parameter gradients, as data-parallel training
does, gives the gradient of the rank-mean of the losses).

The backward of each op is written with these same differentiable ops, so differentiating a
gradient (reverse over reverse, the HVPs' double backward) issues the matching collectives again,
and every op has a forward-mode rule (``jvp``), so forward over reverse works too, with
``torch.autograd.forward_ad`` and with ``torch.func.jvp(torch.func.grad(f))``. The functions use
the ``setup_context`` form of :class:`torch.autograd.Function` that ``torch.func`` transforms
(``grad``, ``jvp``, ``vjp``, ``vmap``, ``functional_call``) require.

**Every rank must call these functions the same number of times, in the same order, with the
same shapes** (a collective waits for all ranks): no rank-dependent branch may skip one, and the
same holds for the backward and forward-mode passes that differentiate them. With one process (no
process group, or a world size of 1) both functions return ``x`` itself and issue nothing.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bissl.distributed.collectives import ProcessGroup, world_size

#: Length of the shape record that :func:`all_gather_cat` exchanges before gathering:
#: ``[ndim, dim, dtype code, *shape, 0-padding]``; ``torch`` tensors have at most 25 dimensions.
_SHAPE_RECORD = 32


def _all_reduce_sum_raw(x: Tensor, group: ProcessGroup | None) -> Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _all_gather_cat_raw(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, group: ProcessGroup | None) -> Tensor:
        return _all_reduce_sum_raw(x, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # d(Σ_s L_s)/dx_r = Σ_s dL_s/dy: the same all-reduce, differentiable again.
        return _AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, _group_t: None) -> Tensor:
        return _AllReduceSum.apply(x_t, ctx.group)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, group: ProcessGroup | None) -> tuple[Tensor, int | None]:
        # Element-wise across ranks; the batch dimension goes first so every rank lays it out alike.
        bdim = in_dims[0]
        if bdim is None:
            return _AllReduceSum.apply(x, group), None
        return _AllReduceSum.apply(x.movedim(bdim, 0), group), 0


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
        return _all_gather_cat_raw(x, dim, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, ctx.dim, ctx.group = inputs
        ctx.size = x.shape[ctx.dim]
        ctx.rank = dist.get_rank(ctx.group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every rank's loss may read every block: sum their gradients, keep this rank's block.
        total = _AllReduceSum.apply(grad, ctx.group)
        return total.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, _dim_t: None, _group_t: None) -> Tensor:
        return _AllGatherCat.apply(x_t, ctx.dim, ctx.group)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, dim: int, group: ProcessGroup | None) -> tuple[Tensor, int | None]:
        bdim = in_dims[0]
        if bdim is None:
            return _AllGatherCat.apply(x, dim, group), None
        return _AllGatherCat.apply(x.movedim(bdim, 0), dim + 1, group), 0


def all_reduce_sum(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """``Σ_r x_r`` over the ranks of ``group``, differentiable to any order (module docstring).

    Args:
        x: any floating tensor; the same shape and dtype on every rank.
        group: process group (default: the world).

    Returns:
        A new tensor of ``x``'s shape, equal on every rank; ``x`` itself with one process.

    Every rank must make the same sequence of calls (and so the same backward passes).
    """
    if world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def _dtype_code(dtype: torch.dtype) -> int:
    # Stable across processes (Python's str hash is salted per process).
    return zlib.crc32(str(dtype).encode()) & 0x7FFFFFFF


def _check_same_shapes(x: Tensor, dim: int, group: ProcessGroup | None) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks pass equal shapes, dtypes, dims.

    One small all-gather of a fixed-length record, so ranks with different ``ndim`` still meet in
    the same collective (a mismatched data gather would instead hang or fail inside gloo/NCCL).
    """
    record = torch.zeros(_SHAPE_RECORD, dtype=torch.int64, device=x.device)
    record[:3] = torch.tensor([x.dim(), dim, _dtype_code(x.dtype)])
    record[3 : 3 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    records = _all_gather_cat_raw(record, 0, group).view(-1, _SHAPE_RECORD).tolist()
    if all(r == records[0] for r in records):
        return
    described = []
    for r, rec in enumerate(records):
        ndim = rec[0]
        described.append(
            f"rank {r}: shape {tuple(rec[3 : 3 + ndim])} dim={rec[1]}"
            + ("" if rec[2] == records[0][2] else " (different dtype)")
        )
    raise ValueError(
        "all_gather_cat: every rank must pass a tensor of the same shape and dtype and the "
        "same dim; got " + "; ".join(described)
    )


def all_gather_cat(x: Tensor, dim: int = 0, group: ProcessGroup | None = None, *, check_shapes: bool = True) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order; differentiable to any order.

    Args:
        x: ``(..., n, ...)``, the same shape and dtype on every rank (``n`` at ``dim``).
        dim: concatenation dimension (negative values count from the end).
        group: process group (default: the world).
        check_shapes: exchange and compare the ranks' shapes first (default). ``False`` skips that
            small all-gather and its host synchronisation, for callers whose shapes are equal by
            construction (SyncBatchNorm's per-channel statistics); unequal shapes then fail inside
            the backend or hang.

    Returns:
        ``(..., N·n, ...)`` for ``N`` ranks, equal on every rank; rows ``[r·n, (r+1)·n)`` along
        ``dim`` are rank ``r``'s ``x`` and carry the gradient back to it. ``x`` itself with one
        process.

    Raises:
        ValueError: ``x`` is 0-dim, ``dim`` is out of range, or (``check_shapes``) the ranks'
            shapes, dtypes or ``dim`` differ (checked with one small all-gather before the data
            moves; every rank raises the same error).

    Every rank must make the same sequence of calls (and so the same backward passes).
    """
    if x.dim() == 0:
        raise ValueError("all_gather_cat: cannot concatenate 0-dim tensors; pass x.reshape(1)")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"all_gather_cat: dim {dim} is out of range for a {x.dim()}-D tensor")
    if world_size(group) == 1:
        return x
    dim = dim % x.dim()
    if check_shapes:
        _check_same_shapes(x, dim, group)
    return _AllGatherCat.apply(x, dim, group)
