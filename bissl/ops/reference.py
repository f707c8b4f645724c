"""Plain-torch references of the fused vector ops: the source of truth, the fallback and the oracle.

Every fused kernel (Triton in ``kernels/``, C++/CUDA in ``csrc/``) computes exactly one of these
functions and is tested against it. All tensors are flat ``(P,)`` vectors of one dtype/device;
scalars that change every iteration (``alpha``, ``beta``) are 0-dim tensors so that a CG loop never
moves them to the host. Functions ending in ``_`` update their first arguments in place.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

#: Block length of :func:`dot_ref` on CPU: short enough that a float32 partial sum stays accurate.
DOT_BLOCK = 1 << 16


def dot_ref(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀb`` (0-dim, in ``a``'s dtype) with float64 accumulation, as the fused kernels accumulate.

    ``torch.dot`` on float32 CPU tensors accumulates in float32: measured 1.3e-5 relative error of
    ``rᵀr`` at P = 1.1e7, which moves a CG step, and so a hypergradient, by as much. On CPU this
    sums float32 dots of :data:`DOT_BLOCK`-element blocks in float64 (measured 3e-8, 2.2 ms at
    P = 1.1e7; a float64 ``sum(a*b)`` takes 40 ms there, most of it page faults of the temporary).
    Elsewhere one float64-accumulated ``sum(a*b)``. No host synchronisation either way. Tensors of
    any shape (same shape for both) are read as their flattened entries.
    """
    if a.dim() != 1:
        a, b = a.reshape(-1), b.reshape(-1)
    if a.device.type != "cpu" or a.dtype == torch.float64 or a.numel() <= DOT_BLOCK:
        return torch.sum(a * b, dtype=torch.float64).to(a.dtype)
    partials = [torch.dot(a[i : i + DOT_BLOCK], b[i : i + DOT_BLOCK]) for i in range(0, a.numel(), DOT_BLOCK)]
    return torch.stack(partials).sum(dtype=torch.float64).to(a.dtype)


def damped_matvec_ref(hv: Tensor, v: Tensor, scale: float, shift: float) -> tuple[Tensor, Tensor]:
    """``Av = scale·Hv + shift·v`` and ``vᵀAv``.

    Args:
        hv: ``(P,)`` the raw matvec ``H v``.
        v: ``(P,)`` the vector it was applied to.
        scale, shift: the damped operator is ``A = scale·H + shift·I``.

    Returns:
        ``(Av, vAv)``: ``(P,)`` and a 0-dim tensor.
    """
    av = torch.add(hv * scale, v, alpha=shift) if shift != 0 else hv * scale
    return av, dot_ref(v, av)


def _damped_block(scale: float, shift: float) -> Callable[[Tensor, Tensor, Tensor], object]:
    """``out_b = scale·hv_b + shift·v_b`` into ``out_b`` with as few kernels as the constants allow,
    chosen once per call (whatever the op returns is unused)."""
    if shift == 1.0:
        return lambda hv, v, out: torch.add(v, hv, alpha=scale, out=out)
    if shift == 0.0:
        return lambda hv, v, out: torch.mul(hv, scale, out=out)
    if scale == 1.0:
        return lambda hv, v, out: torch.add(hv, v, alpha=shift, out=out)

    def general(hv: Tensor, v: Tensor, out: Tensor) -> None:
        torch.mul(hv, scale, out=out)
        out.add_(v, alpha=shift)

    return general


def damped_into_ref_(out: Tensor, hv: list[Tensor], v: Tensor, scale: float, shift: float) -> Tensor:
    """``out = scale·cat(hv) + shift·v`` in place and ``vᵀ out`` (0-dim, ``v``'s dtype, accumulated
    in float64), reading each piece of ``hv`` where it lies (CPU).

    Walks the pieces in blocks of :data:`DOT_BLOCK` elements: each block is written and, while it is
    still in cache, dotted with ``v``, so memory traffic is the three arrays an ideal fused kernel
    moves (read ``hv``, ``v``; write ``out``).

    Args:
        out: ``(P,)`` contiguous, must not overlap the inputs.
        hv: pieces of any shape whose flattened entries, in order, are the ``P`` elements.
        v: ``(P,)``.
        scale, shift: Python numbers.
    """
    block = _damped_block(scale, shift)
    partials: list[Tensor] = []
    start = 0
    for piece in hv:
        piece = piece.reshape(-1)
        n = piece.numel()
        if start + n > v.numel():
            raise ValueError(f"damped_into_: the pieces hold more than the {v.numel()} elements of v")
        for lo in range(0, n, DOT_BLOCK):
            hi = min(n, lo + DOT_BLOCK)
            vb, ob = v[start + lo : start + hi], out[start + lo : start + hi]
            block(piece[lo:hi], vb, ob)
            partials.append(torch.dot(vb, ob))
        start += n
    if start != v.numel():
        raise ValueError(f"damped_into_: the pieces hold {start} elements, v has {v.numel()}")
    if not partials:
        return v.new_zeros(())
    return torch.stack(partials).sum(dtype=torch.float64).to(v.dtype)


def cg_step_ref_(x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: Tensor) -> Tensor:
    """One CG update in place: ``x += α p``, ``r -= α Ap``; returns ``rᵀr`` of the new residual (0-dim)."""
    x.add_(alpha * p)
    r.sub_(alpha * ap)
    return dot_ref(r, r)


def cg_direction_ref_(p: Tensor, r: Tensor, beta: Tensor) -> Tensor:
    """New search direction in place: ``p = r + β p``; returns ``p``."""
    return p.mul_(beta).add_(r)


def _block_bounds(offsets: list[int], n: int, op: str) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` of the blocks ``offsets`` describes over ``n`` elements (validated)."""
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n:
        raise ValueError(f"{op}: offsets must run from 0 to the vectors' length {n}, got {list(offsets)[:3]}...")
    if any(b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"{op}: offsets must be non-decreasing")
    return list(itertools.pairwise(offsets))


def block_dots_ref(u: Tensor, v: Tensor, offsets: list[int]) -> Tensor:
    """``(n_blocks,)`` dots ``u_kᵀv_k`` of the blocks ``[offsets[k], offsets[k+1])`` of two ``(P,)``
    vectors (each as :func:`dot_ref`)."""
    bounds = _block_bounds(offsets, u.numel(), "block_dots")
    return torch.stack([dot_ref(u[lo:hi], v[lo:hi]) for lo, hi in bounds])


def damped_into_blocks_ref_(
    out: Tensor, hv: list[Tensor], v: Tensor, scale: float, shift: float, offsets: list[int]
) -> Tensor:
    """:func:`damped_into_ref_` with ``vᵀout`` per block: ``(n_blocks,)`` (layer-wise CG's ``pᵀAp``)."""
    _block_bounds(offsets, v.numel(), "damped_into_blocks_")
    damped_into_ref_(out, hv, v, scale, shift)
    return block_dots_ref(v, out, offsets)


def cg_step_blocks_ref_(x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: Tensor, offsets: list[int]) -> Tensor:
    """:func:`cg_step_ref_` on every block with its own ``α_k`` (``alpha``: ``(n_blocks,)``); returns
    the new ``r_kᵀr_k`` per block."""
    bounds = _block_bounds(offsets, x.numel(), "cg_step_blocks_")
    return torch.stack(
        [cg_step_ref_(x[lo:hi], r[lo:hi], p[lo:hi], ap[lo:hi], a) for (lo, hi), a in zip(bounds, alpha.unbind())]
    )


def cg_direction_blocks_ref_(p: Tensor, r: Tensor, beta: Tensor, offsets: list[int]) -> None:
    """:func:`cg_direction_ref_` on every block with its own ``β_k`` (``beta``: ``(n_blocks,)``)."""
    bounds = _block_bounds(offsets, p.numel(), "cg_direction_blocks_")
    for (lo, hi), b in zip(bounds, beta.unbind()):
        cg_direction_ref_(p[lo:hi], r[lo:hi], b)


def prox_grad_ref(grad: Tensor, theta: Tensor, phi: Tensor, lam: float) -> Tensor:
    """Lower-level gradient with the proximal pull: ``∇L_P(θ) + λ (θ − φ)``."""
    return torch.add(grad, theta - phi, alpha=lam)


def axpby_ref(a: float, x: Tensor, b: float, y: Tensor) -> Tensor:
    """``a·x + b·y`` (e.g. the upper-level combination ``x + γ ∇_φ L_D(φ)``)."""
    return torch.add(x * a, y, alpha=b)
