"""A faithful re-implementation of the BiSSL reference code's hypergradient loop: our baseline.

Used as the baseline of our benchmarks and as an independent oracle in tests; not for training. It
does the work the authors' code does per upper step, no more and no less:

* ``v = ∇_θ L_D(θ)``: one forward and backward of the upper loss at the lower backbone;
* every CG iteration: a fresh forward of the pretext loss, its ``create_graph=True`` gradient, the
  per-tensor products ``gᵢ·dᵢ`` summed to scalars and a second ``autograd.grad`` of those scalars
  (the authors' HVP), then ``dᵢ + (H d)ᵢ / (λ + damping)`` per tensor with an in-place division;
  on CUDA ``torch.cuda.empty_cache()`` before every HVP, as the authors call it;
* CG on tuples of tensors, one op per tensor: ``rᵀr`` computed once per iteration and carried to
  the next (``new_rdotr``), the residual taken over from ``v`` without a copy, ``1e-12`` added to
  every denominator (``guard``), ``nan_to_num`` on the returned tensors.

Layer-wise CG (``layerwise=True``, the authors' default) keeps one α and β per tensor. The
authors' global path computes ``α = Σᵢ rᵀr / (dᵢᵀ(Hd)ᵢ + 1e-12)``, a sum of per-tensor ratios that
is not CG's step; we compute CG's ``α = rᵀr / (Σᵢ dᵢᵀ(Hd)ᵢ + guard)`` (one division instead of one
per tensor: the same work up to a few scalar operations, and the answer our ``cg`` solver must
match).

The ``guard`` moves the answer: on the per-tensor ``rᵀr`` of small gradients it alone changes a
layer-wise result by a few 1e-6 relative (``docs/performance.md``). Comparisons of exact math pass
``guard=None``: the smallest normal number of the dtype, which changes no nonzero denominator but
keeps ``0/0`` (a block whose residual vanished exactly, e.g. a one-element tensor after one
layer-wise step) at ``0`` where a zero guard would give NaN; the work is the same (the addition is
still made).

BatchNorm runs as the caller's modules are set (the authors keep train mode, so each HVP forward
also moves the running statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bissl.typing import LossFn, Params, ParamsLike

#: The authors' tiny-denominator guard.
AUTHORS_GUARD = 1e-12


def _authors_matvec(
    lower_loss: LossFn, names: list[str], leaves: list[Tensor], c: float, ds: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """``dᵢ + (H d)ᵢ / c`` per tensor, recomputing the loss and its graph (the authors' HVP)."""
    if torch.cuda.is_available() and leaves[0].is_cuda:
        torch.cuda.empty_cache()
    with torch.enable_grad():
        grads = torch.autograd.grad(lower_loss(dict(zip(names, leaves))), leaves, create_graph=True)
        prods = tuple(g.mul(d).sum() for g, d in zip(grads, ds))
        hvps = torch.autograd.grad(prods, leaves)
    return tuple(d + h.div_(c) for d, h in zip(ds, hvps))


def authors_cg_solver(
    mvp: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]],
    vecs: Sequence[Tensor],
    *,
    iters: int,
    layerwise: bool,
    guard: float | None = AUTHORS_GUARD,
) -> tuple[Tensor, ...]:
    """The authors' ``cg_solver`` on tuples of tensors, one op per tensor (module docstring).

    Args:
        mvp: ``ds ↦ A ds`` on tuples (the damped operator itself).
        vecs: the right-hand side, one tensor per parameter; the residual starts *as* these tensors
            (no copy: the updates are out of place and never write into them).
        iters: iterations (one ``mvp`` each).
        layerwise: one α, β per tensor (the authors' default) instead of global CG.
        guard: added to every denominator (the authors': ``1e-12``; ``None`` for exact math, see
            the module docstring).

    Returns:
        ``x``, one tensor per parameter, NaN/Inf replaced by numbers as the authors do.
    """
    if guard is None:
        guard = float(torch.finfo(vecs[0].dtype).tiny)
    xs = tuple(torch.zeros_like(v) for v in vecs)
    rs = tuple(vecs)
    ds = tuple(r.clone() for r in rs)
    if layerwise:
        new_rdotrs = tuple(torch.sum(r**2) for r in rs)
        for _ in range(iters):
            hds = mvp(ds)
            rdotrs = new_rdotrs
            alphas = tuple(rdotr / (torch.sum(d * hd) + guard) for rdotr, d, hd in zip(rdotrs, ds, hds))
            xs = tuple(x + alpha * d for x, d, alpha in zip(xs, ds, alphas))
            rs = tuple(r - alpha * hd for r, hd, alpha in zip(rs, hds, alphas))
            new_rdotrs = tuple(torch.sum(r**2) for r in rs)
            betas = tuple(new / (old + guard) for new, old in zip(new_rdotrs, rdotrs))
            ds = tuple(r + beta * d for r, d, beta in zip(rs, ds, betas))
    else:
        new_rdotr = sum(torch.sum(r**2) for r in rs)
        for _ in range(iters):
            rdotr = new_rdotr
            hds = mvp(ds)
            alpha = rdotr / (sum(torch.sum(d * hd) for d, hd in zip(ds, hds)) + guard)
            xs = tuple(x + alpha * d for x, d in zip(xs, ds))
            rs = tuple(r - alpha * hd for r, hd in zip(rs, hds))
            new_rdotr = sum(torch.sum(r**2) for r in rs)
            beta = new_rdotr / (rdotr + guard)
            ds = tuple(r + beta * d for r, d in zip(rs, ds))
    return tuple(torch.nan_to_num(x) for x in xs)


def reference_hypergrad(
    lower_loss: LossFn,
    upper_loss: LossFn,
    lower_params: ParamsLike,
    *,
    lam: float,
    iters: int = 5,
    damping: float = 0.0,
    layerwise: bool = False,
    guard: float | None = AUTHORS_GUARD,
) -> Params:
    """Solve ``(I + H/(λ+damping)) x = ∇_θ L_D(θ)`` the way the reference code does (module docstring).

    Args:
        lower_loss, upper_loss: scalar losses of the backbone dict.
        lower_params: ``θ``, ``{name: Tensor}``.
        lam, damping: the system is ``I + H/(lam + damping)``.
        iters: CG iterations (one HVP each).
        layerwise: per-tensor α/β (the reference's default) instead of global CG.
        guard: added to every CG denominator (the authors': ``1e-12``; ``None`` for exact math).

    Returns:
        ``x`` keyed like ``lower_params``, NaN/Inf replaced by numbers as the reference does.
    """
    names = list(lower_params)
    # The authors differentiate live parameters: leaves that share the parameters' storage.
    leaves = [lower_params[n].detach().requires_grad_(True) for n in names]
    with torch.enable_grad():
        up = upper_loss(dict(zip(names, leaves)))
        vecs = torch.autograd.grad(up, leaves)
    c = lam + damping
    xs = authors_cg_solver(
        lambda ds: _authors_matvec(lower_loss, names, leaves, c, ds),
        vecs,
        iters=iters,
        layerwise=layerwise,
        guard=guard,
    )
    return dict(zip(names, xs))
