"""The solvers' damped-matvec epilogue, written into a preallocated flat buffer.

A solver iteration receives ``H v`` from the caller's matvec — one flat tensor, or the pieces of a
dict or tuple of tensors — and needs ``A v = scale·H v + shift·v`` in its own ``(P,)`` buffer plus
the quadratic form ``vᵀA v``. :func:`damped_into_` does both in one pass over memory, reading each
piece where the caller left it (no concatenated copy of ``H v`` is ever made) and writing into a
buffer the solver allocated once:

* On CPU it is the op ``bissl::damped_into_`` (:mod:`bissl.ops._library`): with the ``cpp``
  backend its C++ kernel (``csrc/cpu/damped_into.cpp``: parallel chunks of the concatenated index
  space, each written and dotted in cache), otherwise the torch reference
  :func:`~bissl.ops.reference.damped_into_ref_` (blocks of
  :data:`~bissl.ops.reference.DOT_BLOCK` elements, each written and dotted while in cache; two
  small torch calls per block, whose overhead the kernel removes: measured 1.95 → about 1 ms per
  call at P = 3.9 M on a 2-core Intel Xeon). Both move the three arrays an ideal fused kernel
  moves (read ``H v``, ``v``; write ``A v``). The fused ``bissl::damped_matvec`` kernel moves the
  same bytes but *allocates* its output: a fresh ``P``-sized buffer costs first-touch page faults
  (about one copy of the array and more, measured in ``benchmarks/bench_cg_forms.py``), which is
  why it is not used on CPU. Partial dots are summed in float64.
* Elsewhere (CUDA) the pieces are concatenated once and the backend's fused kernel runs; its output
  comes from the caching allocator, so the returned ``A v`` may be a new tensor instead of ``out``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bissl.ops.reference import damped_into_ref_


def damped_into_(
    out: Tensor,
    hv_pieces: Sequence[Tensor],
    v: Tensor,
    scale: float,
    shift: float,
    fused: Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]] | None = None,
    *,
    cpu_kernel: bool = False,
) -> tuple[Tensor, Tensor]:
    """``A v = scale·H v + shift·v`` into ``out`` and ``vᵀ(A v)``; ``H v = cat(hv_pieces)``.

    Args:
        out: ``(P,)`` contiguous buffer that receives ``A v`` (CPU); must not overlap the inputs.
        hv_pieces: tensors whose flattened entries, concatenated in order, are ``H v`` (``P`` in all).
        v: ``(P,)`` contiguous, the vector the matvec was applied to.
        scale, shift: Python numbers.
        fused: the backend's ``damped_matvec(hv, v, scale, shift) -> (Av, vAv)`` kernel, used off
            CPU (required there).
        cpu_kernel: on CPU, run the C++ kernel of ``bissl::damped_into_`` (the ``cpp`` backend;
            requires ``bissl._C``) instead of the torch reference.

    Returns:
        ``(Av, vAv)``: ``Av`` is ``out`` on CPU (else possibly a new tensor); ``vAv`` is 0-dim in
        ``v``'s dtype, accumulated in float64.
    """
    if v.device.type != "cpu":
        if fused is None:
            raise ValueError("damped_into_: a fused damped_matvec kernel is needed off CPU")
        hv = hv_pieces[0] if len(hv_pieces) == 1 else torch.cat(list(hv_pieces))
        return fused(hv.contiguous(), v, scale, shift)
    if cpu_kernel:
        return out, torch.ops.bissl.damped_into_(out, kernel_pieces(hv_pieces), v, float(scale), float(shift))
    return out, damped_into_ref_(out, list(hv_pieces), v, float(scale), float(shift))


def kernel_pieces(hv_pieces: Sequence[Tensor]) -> list[Tensor]:
    """The pieces as the CPU kernels of ``bissl::damped_into_`` and ``damped_into_blocks_`` take
    them: flat and contiguous. The kernels read raw memory, so a piece in another layout (e.g. a
    channels-last weight's product) is brought to the parameters' flat order first."""
    flat = [t.reshape(-1) for t in hv_pieces]
    return [t if t.is_contiguous() else t.contiguous() for t in flat]
