"""The solvers' damped-matvec epilogue, written into a preallocated flat buffer.

A solver iteration receives ``H v`` from the caller's matvec — one flat tensor, or the pieces of a
dict or tuple of tensors — and needs ``A v = scale·H v + shift·v`` in its own ``(P,)`` buffer plus
the quadratic form ``vᵀA v``. :func:`damped_into_` does both in one pass over memory, reading each
piece where the caller left it (no concatenated copy of ``H v`` is ever made) and writing into a
buffer the solver allocated once:

* On CPU it walks the pieces in blocks of :data:`~bissl.ops.reference.DOT_BLOCK` elements: each
  block's ``A v`` is written and, while it is still in cache, dotted with ``v``. Memory traffic is
  the three arrays an ideal fused kernel moves (read ``H v``, ``v``; write ``A v``). The fused
  ``bissl::damped_matvec`` kernel moves the same bytes but *allocates* its output: a fresh
  ``P``-sized buffer costs first-touch page faults (about one copy of the array and more, measured in
  ``benchmarks/bench_cg_forms.py``), which is why it is not used on CPU. The partial dots are summed
  in float64, exactly as :func:`~bissl.ops.reference.dot_ref` sums its blocks.
* Elsewhere (CUDA) the pieces are concatenated once and the backend's fused kernel runs; its output
  comes from the caching allocator, so the returned ``A v`` may be a new tensor instead of ``out``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bissl.ops.reference import DOT_BLOCK


def _block_op(scale: float, shift: float) -> Callable[[Tensor, Tensor, Tensor], object]:
    """``out_b = scale·hv_b + shift·v_b`` with as few kernels as the constants allow (into ``out``;
    whatever the op returns is unused)."""
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


def damped_into_(
    out: Tensor,
    hv_pieces: Sequence[Tensor],
    v: Tensor,
    scale: float,
    shift: float,
    fused: Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """``A v = scale·H v + shift·v`` into ``out`` and ``vᵀ(A v)``; ``H v = cat(hv_pieces)``.

    Args:
        out: ``(P,)`` contiguous buffer that receives ``A v`` (CPU); must not overlap the inputs.
        hv_pieces: 1-D tensors, concatenated in order they are ``H v`` (``P`` elements in all).
        v: ``(P,)`` contiguous, the vector the matvec was applied to.
        scale, shift: Python numbers.
        fused: the backend's ``damped_matvec(hv, v, scale, shift) -> (Av, vAv)`` kernel, used off
            CPU (required there).

    Returns:
        ``(Av, vAv)``: ``Av`` is ``out`` on CPU (else possibly a new tensor); ``vAv`` is 0-dim in
        ``v``'s dtype, accumulated in float64.
    """
    if v.device.type != "cpu":
        if fused is None:
            raise ValueError("damped_into_: a fused damped_matvec kernel is needed off CPU")
        hv = hv_pieces[0] if len(hv_pieces) == 1 else torch.cat(list(hv_pieces))
        return fused(hv.contiguous(), v, scale, shift)
    op = _block_op(float(scale), float(shift))
    partials: list[Tensor] = []
    start = 0
    for piece in hv_pieces:
        n = piece.numel()
        for lo in range(0, n, DOT_BLOCK):
            hi = min(n, lo + DOT_BLOCK)
            vb, ob = v[start + lo : start + hi], out[start + lo : start + hi]
            op(piece[lo:hi], vb, ob)
            partials.append(torch.dot(vb, ob))
        start += n
    if start != v.numel():
        raise ValueError(f"damped_into_: the pieces hold {start} elements, v has {v.numel()}")
    if not partials:
        return out, v.new_zeros(())
    return out, torch.stack(partials).sum(dtype=torch.float64).to(v.dtype)
