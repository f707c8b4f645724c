"""A cheaper second derivative for train-mode ``batch_norm`` on the reverse-over-reverse HVP path.

Autograd's ``batchnorm_double_backward`` is a long chain of full-size elementwise ops (about a third
of a ResNet HVP's elementwise time on CPU). With batch statistics and no running buffers — exactly
the HVP policy of :mod:`bissl.ops.batchnorm` — the double backward has a short closed form. Per
channel, with ``N`` elements, ``⟨·⟩`` the channel mean, ``x̂ = (x − μ)·s``, ``s = (σ² + ε)^(-1/2)``
and the projector ``P(g) = g − ⟨g⟩ − x̂⟨g x̂⟩`` (self-adjoint):

* backward: ``dx = w s P(gy)``, ``dw = Σ gy x̂``, ``db = Σ gy``;
* double backward, for cotangents ``(ĝ, g_w, g_b)`` of ``(dx, dw, db)``:

  - ``∂/∂gy = w s P(ĝ) + g_w x̂ + g_b``;
  - ``∂/∂w  = s Σ ĝ P(gy)``;
  - ``∂/∂x  = s P(u) − (w s² A / N) x̂`` with ``A = Σ ĝ P(gy)`` and
    ``u = −w s (ĝ⟨gy x̂⟩ + gy⟨ĝ x̂⟩) + g_w gy``.

Both Functions also carry forward-mode (jvp) rules, so the forward-over-reverse ``fwdrev`` HVP
(``torch.autograd.forward_ad``) uses them too instead of forward-mode AD's formula for
``native_batch_norm_backward`` (which recomputes the batch statistics). Tested against autograd and
``torch.func`` in float64 (``tests/ops/test_double_backward.py``, ``tests/ops/test_hvp.py``).
Third derivatives are not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _c(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel ``(C,)`` vector shaped to broadcast against ``(N, C, ...)``."""
    return v.view([1, -1] + [1] * (like.dim() - 2))


class _BatchNormBackward(torch.autograd.Function):
    """``(gy, x, w) -> (dx, dw, db)`` via the native backward kernel, differentiable once.

    The double backward is written as per-channel linear combinations of the three full-size
    tensors ``ĝ, gy, x̂`` whose coefficients come from five channel reductions, about half the
    full-size passes of autograd's generic formula.
    """

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, w: Tensor | None, mean: Tensor, invstd: Tensor, eps: float):
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            gy, x, w, None, None, mean, invstd, True, eps, [True, w is not None, True]
        )
        ctx.save_for_backward(gy, x, w, mean, invstd, dw if w is not None else db, db)
        ctx.save_for_forward(gy, x, w, mean, invstd, dx, dw, db)
        ctx.has_weight = w is not None
        return dx, dw, db

    @staticmethod
    def backward(ctx, g_dx: Tensor | None, g_dw: Tensor | None, g_db: Tensor | None):
        gy, x, w, mean, invstd, dw, db = ctx.saved_tensors
        dims = _dims(x)
        n = x.numel() // x.shape[1]
        s = invstd
        ws = s * w if ctx.has_weight else s
        xhat = torch.addcmul(_c(-mean * s, x), x, _c(s, x))
        m_gy, m_gyx = db / n, (dw if ctx.has_weight else (gy * xhat).sum(dims)) / n
        if g_dx is None:
            g_dx = torch.zeros_like(x)
        m_g = g_dx.sum(dims) / n
        m_gx = (g_dx * xhat).sum(dims) / n
        a = (g_dx * gy).sum(dims) - n * (m_g * m_gy + m_gx * m_gyx)  # A = Σ ĝ P(gy)
        gw = g_dw if (g_dw is not None and ctx.has_weight) else torch.zeros_like(s)
        gb = g_db if g_db is not None else torch.zeros_like(s)
        d_gy = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            # w s (ĝ − ⟨ĝ⟩ − x̂⟨ĝx̂⟩) + g_w x̂ + g_b
            # (addcmul chains: one pass per term instead of a multiply and an add each)
            d_gy = torch.addcmul(_c(gb - ws * m_g, x), _c(ws, x), g_dx).addcmul_(_c(gw - ws * m_gx, x), xhat)
        if ctx.needs_input_grad[2] and ctx.has_weight:
            d_w = s * a
        if ctx.needs_input_grad[1]:
            # u = a1 ĝ + a2 gy;  d_x = s (u − ⟨u⟩ − x̂⟨u x̂⟩) − (w s² A / N) x̂
            a1, a2 = -ws * m_gyx, gw - ws * m_gx
            m_u = a1 * m_g + a2 * m_gy
            m_ux = a1 * m_gx + a2 * m_gyx
            d_x = (
                torch.addcmul(_c(-s * m_u, x), _c(s * a1, x), g_dx)
                .addcmul_(_c(s * a2, x), gy)
                .addcmul_(_c(-s * m_ux - ws * s * a / n, x), xhat)
            )
        return d_gy, d_x, d_w, None, None, None

    @staticmethod
    def jvp(ctx, gy_t, x_t, w_t, _mean_t, _invstd_t, _eps):
        # Forward over reverse (module docstring's notation, ṡ/s = −s⟨x̂ẋ⟩, ẋ̂ = s P(ẋ)):
        # ġx = −s⟨x̂ẋ⟩ gx + w s (P(ġy) − ẋ̂⟨gy x̂⟩ − x̂⟨gy ẋ̂⟩) + ẇ s P(gy).
        gy, x, w, mean, s, gx, dw, db = ctx.saved_tensors
        dims, n = _dims(x), x.numel() // x.shape[1]
        ws = s * w if w is not None else s
        xhat = torch.addcmul(_c(-mean * s, x), x, _c(s, x))
        m_gyx = ((gy * xhat).sum(dims) if dw is None else dw) / n
        out = torch.zeros_like(x)
        if gy_t is not None:  # w s P(ġy)
            out = out.addcmul_(_c(ws, x), gy_t).add_(_c(-ws * gy_t.sum(dims) / n, x))
            out = out.addcmul_(xhat, _c(-ws * (gy_t * xhat).sum(dims) / n, x))
        xh_t = None
        if x_t is not None:
            m_x, m_xx = x_t.sum(dims) / n, (x_t * xhat).sum(dims) / n
            xh_t = torch.addcmul(_c(-s * m_x, x), _c(s, x), x_t).addcmul_(xhat, _c(-s * m_xx, x))
            out = out.addcmul_(gx, _c(-s * m_xx, x)).addcmul_(xh_t, _c(-ws * m_gyx, x))
            out = out.addcmul_(xhat, _c(-ws * (gy * xh_t).sum(dims) / n, x))
        if w_t is not None and w is not None:  # ẇ s P(gy)
            out = out.addcmul_(_c(w_t * s, x), gy).add_(_c(-w_t * s * db / n, x))
            out = out.addcmul_(xhat, _c(-w_t * s * m_gyx, x))
        gw_t = None
        if dw is not None:
            gw_t = (gy_t * xhat).sum(dims) if gy_t is not None else torch.zeros_like(dw)
            if xh_t is not None:
                gw_t = gw_t + (gy * xh_t).sum(dims)
        gb_t = gy_t.sum(dims) if gy_t is not None else torch.zeros_like(db)
        return out, gw_t, gb_t


class _BatchNormTrain(torch.autograd.Function):
    """Train-mode batch norm with batch statistics and no running buffers."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float):
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.save_for_forward(x, w, mean, invstd)
        ctx.has_bias = b is not None
        ctx.eps = eps
        return out

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _eps):
        # ẏ = w s P(ẋ) + ẇ x̂ + ḃ
        x, w, mean, s = ctx.saved_tensors
        dims, n = _dims(x), x.numel() // x.shape[1]
        xhat = torch.addcmul(_c(-mean * s, x), x, _c(s, x))
        out = torch.zeros_like(x)
        if x_t is not None:
            ws = s * w if w is not None else s
            out = out.addcmul_(_c(ws, x), x_t).add_(_c(-ws * x_t.sum(dims) / n, x))
            out = out.addcmul_(xhat, _c(-ws * (x_t * xhat).sum(dims) / n, x))
        if w_t is not None:
            out = out.addcmul_(xhat, _c(w_t, x))
        if b_t is not None:
            out = out.add_(_c(b_t, x))
        return out

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, mean, invstd = ctx.saved_tensors
        dx, dw, db = _BatchNormBackward.apply(gy.contiguous(), x, w, mean, invstd, ctx.eps)
        return dx, dw, (db if ctx.has_bias else None), None


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` with the fast double backward."""
    return _BatchNormTrain.apply(x, weight, bias, eps)
