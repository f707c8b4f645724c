"""Shared set-up of a linear problem: any vector form in, one flat buffer inside, the caller's form out.

Every solver solves ``(scale·A + shift·I) x = b`` on contiguous ``(P,)`` buffers, whatever form the
caller's vectors take — a ``{name: Tensor}`` dict, a tuple/list of tensors or a flat ``(P,)``
tensor (:mod:`bissl.ops.flat`):

* ``b`` is copied once into the solver's own buffer (it never aliases the caller's tensors, which
  the solver would otherwise overwrite);
* the caller's ``matvec`` is fed zero-copy *views* of the solver's buffer, in ``b``'s form (it must
  not modify them), and may return any form (dict, tuple/list, flat) laid out like ``b``;
* its result is read once, where it lies, by the damped epilogue
  (:func:`bissl.ops.damped_into.damped_into_`), which writes ``A v = scale·H v + shift·v`` into a
  solver buffer allocated once per solve and returns ``vᵀA v``;
* the answer is returned as views of the solver's buffer in ``b``'s form.

The work buffers (the copy of ``b``, the matvec's output, search directions) come from a
:class:`~bissl.solvers.workspace.Workspace` when the caller passes one, so that repeated solves of
a large problem do not fault in fresh pages every time (that module says why); the answer never does.

All inner products of the solvers go through :meth:`LinearProblem.dot` /
:meth:`LinearProblem.reduce` (the fused kernels return theirs): when the flat vectors are one
rank's partition of a vector sharded across ranks (:mod:`bissl.distributed.shard`), ``allreduce``
sums the partial products there, so every scalar — and every branch — is the same on all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bissl.ops._backends import CGVectorOps, cg_vector_ops
from bissl.ops.damped_into import damped_into_, kernel_pieces
from bissl.ops.flat import FlatSpec, as_form, one_buffer, pieces, vector_form, vector_spec
from bissl.ops.reference import dot_ref
from bissl.solvers.workspace import Workspace
from bissl.typing import Vector

#: Sums a tensor of partial dot products over the partitions of a vector (an all-reduce across
#: ranks when each rank holds one partition).
AllReduce = Callable[[Tensor], Tensor]


def dot(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀb`` of two flat vectors (0-dim, float64-accumulated): every solver's inner product."""
    return dot_ref(a, b)


@dataclass
class LinearProblem:
    """``(scale·A + shift·I) x = b`` on flat ``(P,)`` buffers (module docstring).

    Attributes:
        matvec: the caller's ``A`` (before scale/shift), taking ``b``'s form (None: identity_solve,
            which makes no matvec).
        b: ``(P,)`` the solver's own copy of the right-hand side (may be reused as a work buffer).
        spec, form: layout and form of the caller's vectors.
        scale, shift: of the damped operator.
        ops: the fused vector ops of the chosen backend.
        where: the solver's name, for error messages.
        allreduce: sums partial dots when the vectors are partitions (None: they are whole).
        workspace: where the work buffers live across solves (None: allocated per solve).
    """

    matvec: Callable[[Vector], Vector] | None
    b: Tensor
    spec: FlatSpec
    form: str
    scale: float
    shift: float
    ops: CGVectorOps
    where: str
    allreduce: AllReduce | None = None
    workspace: Workspace | None = None

    def reduce(self, partial: Tensor) -> Tensor:
        """A dot product (or a tensor of them) of the whole vectors from this partition's share."""
        return partial if self.allreduce is None else self.allreduce(partial)

    def dot(self, u: Tensor, v: Tensor) -> Tensor:
        """``uᵀv`` of the whole vectors (0-dim, float64-accumulated)."""
        return self.reduce(dot_ref(u, v))

    def norm(self, u: Tensor) -> Tensor:
        """``‖u‖`` of the whole vector."""
        return self.dot(u, u).clamp_min(0).sqrt()

    def any_nonfinite(self, u: Tensor) -> Tensor:
        """Whether any entry of the whole vector is NaN or Inf (0-dim bool)."""
        bad = ~torch.isfinite(u).all()
        return bad if self.allreduce is None else self.allreduce(bad.to(u.dtype)) > 0

    def views(self, flat: Tensor) -> Vector:
        """``flat`` in the caller's form, as zero-copy views."""
        return as_form(flat, self.spec, self.form)

    to_user = views

    def empty(self, slot: str, rows: int = 0) -> Tensor:
        """A ``(P,)`` work buffer like ``b`` (``(rows, P)`` if ``rows``), uninitialised: the
        workspace's buffer named ``slot`` when there is a workspace, else a new one. Never the answer."""
        p = self.b.numel()
        shape = (rows, p) if rows else (p,)
        if self.workspace is None:
            return self.b.new_empty(shape)
        return self.workspace.buffer(slot, max(rows, 1) * p, self.b.dtype, self.b.device).view(shape)

    def copy_of(self, slot: str, src: Tensor) -> Tensor:
        """A work buffer (:meth:`empty`) holding a copy of the flat ``src``."""
        return self.empty(slot).copy_(src)

    def finish(self) -> None:
        """The solve is over: its workspace may serve the next one."""
        if self.workspace is not None:
            self.workspace.release(self)

    def hv_pieces(self, v: Tensor) -> list[Tensor]:
        """The caller's ``H v`` for the flat ``v``, as the flat pieces it returned (validated, detached)."""
        assert self.matvec is not None  # only identity_solve has none, and it makes no matvec
        out = self.matvec(self.views(v))
        parts = [t.detach() for t in pieces(out, self.spec, f"{self.where}: matvec", self.form)]
        whole = one_buffer(parts)
        return parts if whole is None else [whole]

    def apply(self, v: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """``(A v, vᵀA v)`` with ``A v = scale·H v + shift·v`` written into ``out`` (on CPU);
        ``vᵀA v`` is of the whole vectors (reduced across partitions).

        One matvec; off CPU the returned ``A v`` may be a new tensor (use it, not ``out``).
        """
        av, vav = damped_into_(
            out, self.hv_pieces(v), v, self.scale, self.shift, self.ops.damped_matvec, cpu_kernel=self.ops.name == "cpp"
        )
        return av, self.reduce(vav)

    def block_ops(self, bounds: list[tuple[int, int]]) -> BlockVectorOps:
        """Layer-wise CG's per-block vector work over ``bounds`` (:class:`BlockVectorOps`)."""
        return BlockVectorOps(self, bounds)

    def from_user(self, v: Vector, what: str) -> Tensor:
        """A new ``(P,)`` buffer holding ``v`` (any form laid out like ``b``), e.g. an initial guess."""
        parts = pieces(v, self.spec, what, self.form)
        return torch.cat([t.detach() for t in parts]) if len(parts) > 1 else parts[0].detach().clone()

    def segment_bounds(self, segments: Tensor | Sequence[int] | None) -> list[tuple[int, int]]:
        """``[(lo, hi), ...]`` blocks of the flat vector for layer-wise solvers.

        One block per tensor of a dict/tuple ``b``; for a flat ``b``, the blocks ``segments``
        describes (block lengths, or a ``(P,)`` int64 tensor of non-decreasing block ids; ids with
        no element give empty blocks) or a single block.
        """
        if self.form != "flat":
            return list(zip(self.spec.offsets[:-1], self.spec.offsets[1:]))
        n = self.b.numel()
        if segments is None:
            return [(0, n)]
        if isinstance(segments, Tensor):
            if segments.shape != self.b.shape or segments.dtype != torch.int64:
                raise ValueError(f"{self.where}: segments must be an int64 tensor shaped like b")
            seg = segments.to("cpu")
            if seg.numel() and (bool((seg[1:] < seg[:-1]).any()) or int(seg[0]) < 0):
                raise ValueError(
                    f"{self.where}: segment ids must be non-negative and non-decreasing "
                    "(each block a contiguous range of b)"
                )
            lengths = torch.bincount(seg).tolist() if seg.numel() else []
        else:
            lengths = [int(k) for k in segments]
            if any(k < 0 for k in lengths) or sum(lengths) != n:
                raise ValueError(f"{self.where}: segment lengths must be >= 0 and sum to {n}, got {sum(lengths)}")
        bounds, lo = [], 0
        for k in lengths:
            bounds.append((lo, lo + k))
            lo += k
        return bounds or [(0, n)]


class BlockVectorOps:
    """The vector work of layer-wise CG on the blocks ``bounds`` (contiguous, covering the flat vector).

    With the ``cpp`` backend on CPU every block goes in one call to the ``bissl::*_blocks_`` ops
    (``csrc/cpu/cg_blocks.cpp``), and the per-block ``pᵀAp`` comes out of the damped epilogue's
    own pass. Otherwise the backend's whole-vector ops run on each block's views, and ``pᵀAp`` is
    one more pass of per-block dots. Per-block results are ``(n_blocks,)`` tensors of the whole
    vectors (reduced across partitions).
    """

    def __init__(self, prob: LinearProblem, bounds: list[tuple[int, int]]):
        self.prob = prob
        self.bounds = bounds
        self.offsets = [lo for lo, _ in bounds] + [bounds[-1][1]]
        self.kernel = prob.ops.name == "cpp" and prob.b.device.type == "cpu"

    def blocks(self, t: Tensor) -> list[Tensor]:
        return [t[lo:hi] for lo, hi in self.bounds]

    def dots(self, u: Tensor, v: Tensor) -> Tensor:
        """``u_kᵀv_k`` per block."""
        return self.prob.reduce(torch.stack([dot(a, b) for a, b in zip(self.blocks(u), self.blocks(v))]))

    def apply(self, v: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """``(A v, v_kᵀ(A v)_k per block)``: one matvec (``A v`` as :meth:`LinearProblem.apply`)."""
        prob = self.prob
        if not self.kernel:
            av, _ = prob.apply(v, out)
            return av, self.dots(v, av)
        parts = kernel_pieces(prob.hv_pieces(v))
        vav = torch.ops.bissl.damped_into_blocks_(out, parts, v, float(prob.scale), float(prob.shift), self.offsets)
        return out, prob.reduce(vav)

    def step_(self, x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: Tensor) -> Tensor:
        """``x_k += α_k p_k``, ``r_k −= α_k (Ap)_k``; the new ``r_kᵀr_k`` per block."""
        if self.kernel:
            return self.prob.reduce(torch.ops.bissl.cg_step_blocks_(x, r, p, ap, alpha, self.offsets))
        step = self.prob.ops.cg_step_
        parts = zip(self.blocks(x), self.blocks(r), self.blocks(p), self.blocks(ap), alpha.unbind())
        return self.prob.reduce(torch.stack([step(*part) for part in parts]))

    def direction_(self, p: Tensor, r: Tensor, beta: Tensor) -> None:
        """``p_k = r_k + β_k p_k``."""
        if self.kernel:
            torch.ops.bissl.cg_direction_blocks_(p, r, beta, self.offsets)
            return
        for pk, rk, bk in zip(self.blocks(p), self.blocks(r), beta.unbind()):
            self.prob.ops.cg_direction_(pk, rk, bk)


def linear_problem(
    matvec: Callable | None,
    b: Vector,
    scale: float,
    shift: float,
    where: str,
    backend: str | None = None,
    allreduce: AllReduce | None = None,
    workspace: Workspace | None = None,
) -> LinearProblem:
    """Validate ``b`` and the constants, copy ``b`` into a flat buffer once (module docstring).
    ``allreduce``: ``b`` is this rank's flat partition of a sharded vector (see above).
    ``workspace``: holds the work buffers, ``b``'s copy included (the solver must then not return
    that copy as its answer); the solver calls :meth:`LinearProblem.finish` when done."""
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(f"{where}: workspace must be a bissl.solvers.Workspace, got {type(workspace).__name__}")
    if (
        isinstance(scale, bool)
        or isinstance(shift, bool)
        or not (isinstance(scale, (int, float)) and isinstance(shift, (int, float)))
    ):
        raise TypeError(f"{where}: scale and damping must be Python numbers")
    vector_form(b, where)
    try:
        form, spec = vector_spec(b, where)
    except TypeError as err:
        raise TypeError(f"{where}: b must be floating point ({err})") from None
    parts = pieces(b, spec, f"{where}: b", form)
    ops = cg_vector_ops(backend, spec.device)
    if allreduce is not None and form != "flat":
        raise TypeError(f"{where}: a partitioned problem (allreduce) takes a flat b, got a {form}")
    if workspace is None:
        flat = torch.empty(spec.numel, dtype=spec.dtype, device=spec.device)
    else:
        workspace.check_free(where)  # before its buffers are touched: an outer solve may own them
        flat = workspace.buffer("b", spec.numel, spec.dtype, spec.device)
    # One copy: the solver writes into its vectors and must never alias the caller's storage.
    torch.cat([t.detach() for t in parts], out=flat)
    prob = LinearProblem(matvec, flat, spec, form, float(scale), float(shift), ops, where, allreduce, workspace)
    if workspace is not None:
        workspace.acquire(prob, where)
    return prob


def tiny(dtype: torch.dtype) -> float:
    """A squared-residual floor below which the residual is round-off (avoids 0/0 after convergence)."""
    return float(torch.finfo(dtype).tiny) ** 0.5
