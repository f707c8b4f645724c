"""A faithful re-implementation of the BiSSL reference code's hypergradient loop.

Used as the baseline of our benchmarks and as an independent oracle in tests; not for training.
Per CG iteration it recomputes the pretext forward pass, the ``create_graph=True`` gradient and a
double backward (the reference's HVP), and updates CG state with Python loops over the list of
parameter tensors (one op per tensor). BatchNorm runs as the caller's modules are set (the reference
keeps train mode, so each HVP forward also moves the running statistics). On CUDA it calls
``torch.cuda.empty_cache()`` after each HVP as the reference does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bissl.typing import LossFn, Params, ParamsLike


def _reference_hvp(lower_loss: LossFn, theta: list[Tensor], names: list[str], vec: list[Tensor]) -> list[Tensor]:
    params = {n: t.detach().requires_grad_(True) for n, t in zip(names, theta)}
    with torch.enable_grad():
        loss = lower_loss(params)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        hv = torch.autograd.grad(grads, list(params.values()), vec)
    if torch.cuda.is_available() and theta[0].is_cuda:
        torch.cuda.empty_cache()
    return [h.detach() for h in hv]


def reference_hypergrad(
    lower_loss: LossFn,
    upper_loss: LossFn,
    lower_params: ParamsLike,
    *,
    lam: float,
    iters: int = 5,
    damping: float = 0.0,
    layerwise: bool = False,
) -> Params:
    """Solve ``(I + H/(λ+damping)) x = ∇_θ L_D(θ)`` the way the reference code does.

    Args:
        layerwise: per-tensor α/β (the reference's default) instead of global CG.

    Returns:
        ``x`` keyed like ``lower_params``. Division guards as the reference (tiny denominators);
        NaN is *not* scrubbed here (the reference's ``nan_to_num`` would hide the failure).
    """
    names = list(lower_params)
    theta = [lower_params[n].detach() for n in names]
    leaves = [t.clone().requires_grad_(True) for t in theta]
    with torch.enable_grad():
        up = upper_loss(dict(zip(names, leaves)))
        v = [g.detach() for g in torch.autograd.grad(up, leaves)]
    c = lam + damping
    eps = 1e-12
    x = [torch.zeros_like(t) for t in v]
    r = [t.clone() for t in v]
    p = [t.clone() for t in v]
    for _ in range(iters):
        hv = _reference_hvp(lower_loss, theta, names, p)
        ap = [pi + h / c for pi, h in zip(p, hv)]
        if layerwise:
            for i in range(len(x)):
                rr = torch.sum(r[i] * r[i])
                alpha = rr / (torch.sum(p[i] * ap[i]) + eps)
                x[i] = x[i] + alpha * p[i]
                r[i] = r[i] - alpha * ap[i]
                beta = torch.sum(r[i] * r[i]) / (rr + eps)
                p[i] = r[i] + beta * p[i]
        else:
            rr = sum(torch.sum(ri * ri) for ri in r)
            alpha = rr / (sum(torch.sum(pi * api) for pi, api in zip(p, ap)) + eps)
            x = [xi + alpha * pi for xi, pi in zip(x, p)]
            r = [ri - alpha * api for ri, api in zip(r, ap)]
            beta = sum(torch.sum(ri * ri) for ri in r) / (rr + eps)
            p = [ri + beta * pi for ri, pi in zip(r, p)]
    return dict(zip(names, x))
