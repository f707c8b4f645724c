"""Triton kernel: damped matvec epilogue ``Av = scale·Hv + shift·v`` fused with ``vᵀAv``.

One pass reads ``Hv`` and ``v`` and writes ``Av`` (3 vector passes) instead of torch's 5 (scale,
add, dot). ``scale``/``shift`` are float64 kernel arguments so float64 vectors keep full precision
(an unannotated Python float becomes float32 in a compiled Triton kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bissl.kernels._checks import check_flat_vectors
from bissl.kernels._common import partials_buffer, reduction_chunk, reduction_configs, sum_partials
from torch import Tensor


@triton.autotune(configs=reduction_configs(), key=["n", "CHUNK"])
@triton.jit
def _damped_matvec_kernel(
    hv_ptr,
    v_ptr,
    av_ptr,
    partial_ptr,
    scale: tl.float64,
    shift: tl.float64,
    n,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=hv_ptr.dtype.element_ty)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        hv = tl.load(hv_ptr + idx, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        av = (scale * hv + shift * v).to(hv.dtype)
        tl.store(av_ptr + idx, av, mask=mask)
        acc += v * av  # masked lanes load 0 and add 0
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


def damped_matvec_triton(
    hv: Tensor, v: Tensor, scale: float, shift: float
) -> tuple[Tensor, Tensor]:
    """``(Av, vᵀAv)`` with ``Av = scale·hv + shift·v``; hv, v: ``(P,)``; returns ``(P,)``, 0-dim."""
    check_flat_vectors("damped_matvec", "triton", hv=hv, v=v)
    n = hv.numel()
    av = torch.empty_like(hv)
    if n == 0:
        return av, hv.new_zeros(())
    chunk = reduction_chunk(n)
    partials = partials_buffer(n, chunk, hv)
    _damped_matvec_kernel[(partials.numel(),)](
        hv, v, av, partials, float(scale), float(shift), n, CHUNK=chunk
    )
    return av, sum_partials(partials, hv.dtype)
