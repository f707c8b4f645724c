"""Second derivatives of ``layer_norm`` for both HVP paths: a short double backward and jvp rules.

Per row of ``D`` normalised features, with ``⟨·⟩`` the row mean, ``x̂ = (x − μ)·s``,
``s = (σ² + ε)^(-1/2)`` and the symmetric map ``P(z) = z − ⟨z⟩ − x̂⟨z x̂⟩`` (so ``dx̂ = s P(dx)``,
``ds = −s²⟨x̂ dx⟩``), the first backward of ``y = w x̂ + b`` is

    ``ĝ = gy w``,  ``gx = s P(ĝ)``,  ``gw = Σ_rows gy x̂``,  ``gb = Σ_rows gy``.

* Forward over reverse (tangents ``ġy, ẋ, ẇ``; ``ẋ̂ = s P(ẋ)``):
  ``ġx = −s⟨x̂ẋ⟩ gx + s (ġ̂ − ⟨ġ̂⟩ − ẋ̂⟨ĝx̂⟩ − x̂⟨ġ̂x̂⟩ − x̂⟨ĝẋ̂⟩)`` with ``ġ̂ = ġy w + gy ẇ``,
  ``ġw = Σ_rows (ġy x̂ + gy ẋ̂)``, ``ġb = Σ_rows ġy``.
* Double backward (its transpose), for cotangents ``(u, c_w, c_b)`` of ``(gx, gw, gb)``:
  ``∂/∂gy = w s P(u) + c_w x̂ + c_b``, ``∂/∂w = Σ_rows gy s P(u)``,
  ``∂/∂x = s P(c_w gy) − s²⟨ĝx̂⟩ P(u) − (s/D)((u·gx) x̂ + (u·x̂) gx)`` (``·``: row dot product).

Autograd's ``native_layer_norm_backward`` double backward and, under forward-mode AD, its jvp
run several dozen small ops per call (~16% of a linearised matvec on the benchmark transformer,
torch.profiler). Here the forward computes ``x̂`` once, the set-up that builds the first-order
graph stores ``gy``, ``gx`` and ``⟨ĝx̂⟩`` once, and every matvec is the formula above. Measured on
the benchmark transformer (2 threads, interleaved A/B): the linearised matvec ~17% faster
(15.8 → 13.2 ms), the forward-over-reverse HVP ~15% faster. The double backward itself is the op
``bissl::layer_norm_double_backward`` (:func:`layer_norm_double_backward`): its C++ CPU kernel does
each row in two passes; :func:`layer_norm_double_backward_ref` is the torch formula, its default
and the test oracle. Values and first derivatives are the stock kernels' (bit-identical); only the
second derivative is computed differently (float rounding). Third derivatives are not supported.
Tested against autograd in float64 (``tests/ops/test_double_backward.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bissl.ops.gelu_double_backward import _is_dual, _third_order_guard


def _rows(t: Tensor, d: int) -> Tensor:
    return t.reshape(-1, d)


def _project(z: Tensor, xhat: Tensor, zx_mean: Tensor | None = None) -> Tensor:
    """``P(z) = z − ⟨z⟩ − x̂⟨z x̂⟩`` row-wise on ``(M, D)`` tensors (``⟨z x̂⟩`` if already known)."""
    zx_mean = (z * xhat).mean(1, keepdim=True) if zx_mean is None else zx_mean
    return (z - z.mean(1, keepdim=True)).addcmul_(xhat, zx_mean, value=-1.0)


def layer_norm_double_backward_ref(
    u: Tensor,
    c_w: Tensor | None,
    c_b: Tensor | None,
    gy: Tensor,
    xhat: Tensor,
    s: Tensor,
    gx: Tensor,
    m_gxh: Tensor,
    w: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The double backward above, in torch: the reference of ``bissl::layer_norm_double_backward``.

    Args:
        u: ``(M, D)`` cotangent of ``gx``; ``c_w``, ``c_b``: ``(D,)`` cotangents of ``gw``, ``gb``
            (or ``None``: zero).
        gy, xhat, gx: ``(M, D)``, the point's output cotangent, normalised input and input gradient;
            ``s``, ``m_gxh``: ``(M, 1)``, ``(σ² + ε)^(-1/2)`` and ``⟨ĝx̂⟩``; ``w``: ``(D,)`` or ``None``.

    Returns:
        ``(∂/∂gy, ∂/∂x, ∂/∂w)``: ``(M, D)``, ``(M, D)``, and ``(D,)`` (``(0,)`` when ``w`` is ``None``).
    """
    d = xhat.shape[1]
    w1 = w.reshape(1, d) if w is not None else None
    uxh = (u * xhat).sum(1, keepdim=True)
    pu = _project(u, xhat, uxh / d)
    spu = s * pu
    d_gy = spu * w1 if w1 is not None else spu.clone()
    if c_w is not None:
        d_gy = d_gy.addcmul_(xhat, c_w.reshape(1, d))
    if c_b is not None:
        d_gy = d_gy.add_(c_b.reshape(1, d))
    d_w = (gy * spu).sum(0) if w is not None else xhat.new_empty(0)
    ugx = (u * gx).sum(1, keepdim=True)
    d_x = (pu * (-s * s * m_gxh)).addcmul_(xhat, ugx * (-s / d)).addcmul_(gx, uxh * (-s / d))
    if c_w is not None:
        d_x = d_x.addcmul_(s, _project(c_w.reshape(1, d) * gy, xhat))
    return d_gy, d_x, d_w


def layer_norm_double_backward(
    u: Tensor,
    c_w: Tensor | None,
    c_b: Tensor | None,
    gy: Tensor,
    xhat: Tensor,
    s: Tensor,
    gx: Tensor,
    m_gxh: Tensor,
    w: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`layer_norm_double_backward_ref`'s contract, by ``bissl::layer_norm_double_backward``.

    The op runs the C++ kernel on CPU when ``bissl._C`` is loaded (``csrc/cpu/layer_norm_double_backward.cpp``:
    two passes over each row instead of about twenty full-size torch ops), the torch reference
    elsewhere. Dtypes the kernel does not take (half precision) go to the reference directly.
    """
    if xhat.dtype in (torch.float32, torch.float64):
        return torch.ops.bissl.layer_norm_double_backward(u, c_w, c_b, gy, xhat, s, gx, m_gxh, w)
    return layer_norm_double_backward_ref(u, c_w, c_b, gy, xhat, s, gx, m_gxh, w)


class _LayerNormBackward(torch.autograd.Function):
    """``(gy, x, w) -> (gx, gw, gb)`` by the native kernel; differentiable once (either mode).

    ``xhat`` (``(M, D)``) and ``s`` (``(M, 1)``) are constants of the point, computed once by the
    forward.
    """

    @staticmethod
    def forward(
        ctx,
        gy: Tensor,
        x: Tensor,
        w: Tensor | None,
        b: Tensor | None,
        mean: Tensor,
        rstd: Tensor,
        xhat: Tensor,
        shape: Sequence[int],
        mask: tuple[bool, bool, bool],
        build_graph: bool,
    ):
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(gy, x, shape, mean, rstd, w, b, list(mask))
        d = math.prod(int(k) for k in shape)
        ctx.d, ctx.x_shape, ctx.mask, ctx.norm_shape = d, x.shape, mask, list(shape)
        s, gy2 = _rows(rstd, 1), _rows(gy, d)
        w1 = w.reshape(1, d) if w is not None else None
        g = gy2 * w1 if w1 is not None else gy2
        m_gxh = (g * xhat).mean(1, keepdim=True)  # ⟨ĝx̂⟩
        # gx is saved as the output itself, never as a view of it: a saved view of an output is
        # not recognised as one, holds this node through its grad_fn, and the node holds it: a
        # reference cycle that kept every linearisation's graph alive (~170 MB per call on the
        # benchmark ViT, measured by RSS growth).
        ctx.save_for_forward(gy2, xhat, s, w1, g, gx, m_gxh)
        if build_graph:
            # The point is fixed for every later matvec: store what the double backward reads.
            ctx.save_for_backward(gy2, xhat, s, gx, m_gxh, w1)
        return gx, gw, gb

    @staticmethod
    def backward(ctx, u: Tensor | None, c_w: Tensor | None, c_b: Tensor | None):
        _third_order_guard("layer_norm double backward")
        if not ctx.saved_tensors:
            raise RuntimeError("layer_norm double backward: the first backward did not build a graph")
        gy, xhat, s, gx, m_gxh, w1 = ctx.saved_tensors
        d = ctx.d
        u = _rows(u, d).contiguous() if u is not None else torch.zeros_like(xhat)
        w = w1.reshape(d) if w1 is not None else None
        c_w = c_w.reshape(d).contiguous() if c_w is not None and w is not None else None
        c_b = c_b.reshape(d).contiguous() if c_b is not None else None
        d_gy, d_x, d_w = layer_norm_double_backward(u, c_w, c_b, gy, xhat, s, _rows(gx, d), m_gxh, w)
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        return (
            d_gy.reshape(ctx.x_shape) if need_gy else None,
            d_x.reshape(ctx.x_shape) if need_x else None,
            d_w.reshape(ctx.norm_shape) if need_w and w is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx, gy_t, x_t, w_t, _b_t, _mean_t, _rstd_t, _xhat_t, _shape, _mask, _build):
        gy, xhat, s, w1, g, gx, m_gxh = ctx.saved_tensors
        d = ctx.d
        gx = _rows(gx, d)
        # ġ̂ = ġy w + gy ẇ
        g_t = None
        if gy_t is not None:
            g_t = _rows(gy_t, d) * w1 if w1 is not None else _rows(gy_t, d).clone()
        if w_t is not None:
            term = gy * w_t.reshape(1, d)
            g_t = term if g_t is None else g_t.add_(term)
        gx_t = s * _project(g_t, xhat) if g_t is not None else torch.zeros_like(xhat)
        if x_t is not None:
            # − s⟨x̂ẋ⟩ gx − s (ẋ̂⟨ĝx̂⟩ + x̂⟨ĝẋ̂⟩), ẋ̂ = s P(ẋ)
            x2 = _rows(x_t, d)
            xx = (x2 * xhat).mean(1, keepdim=True)
            xh_t = s * _project(x2, xhat, xx)
            gx_t = gx_t.addcmul_(gx, s * xx, value=-1.0).addcmul_(xh_t, s * m_gxh, value=-1.0)
            gx_t = gx_t.addcmul_(xhat, s * (g * xh_t).mean(1, keepdim=True), value=-1.0)
        gw_t = gb_t = None
        if ctx.mask[1]:
            gw_t = (_rows(gy_t, d) * xhat).sum(0) if gy_t is not None else torch.zeros_like(xhat[0])
            if x_t is not None:
                gw_t = gw_t.add_((gy * xh_t).sum(0))
            gw_t = gw_t.reshape(ctx.norm_shape)
        if ctx.mask[2]:
            gb_t = _rows(gy_t, d).sum(0) if gy_t is not None else torch.zeros_like(xhat[0])
            gb_t = gb_t.reshape(ctx.norm_shape)
        return gx_t.reshape(ctx.x_shape), gw_t, gb_t


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, b: Tensor | None, shape: Sequence[int], eps: float):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, w, b, eps)
        d = math.prod(int(k) for k in shape)
        ctx.shape, ctx.d, ctx.x_shape_out = list(shape), d, x.shape
        s = _rows(rstd, 1)
        xhat = (_rows(x, d) - _rows(mean, 1)) * s  # once: the jvp and both backwards read it
        ctx.save_for_backward(x, w, b, mean, rstd, xhat)
        ctx.save_for_forward(w, s, xhat)
        return out

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _shape, _eps):
        w, s, xhat = ctx.saved_tensors
        d = ctx.d
        y_t = None
        if x_t is not None:  # w s P(ẋ)
            y_t = _project(_rows(x_t, d), xhat).mul_(s)
            if w is not None:
                y_t = y_t.mul_(w.reshape(1, d))
        if w_t is not None:
            term = xhat * w_t.reshape(1, d)
            y_t = term if y_t is None else y_t.add_(term)
        if b_t is not None:
            y_t = b_t.reshape(1, d).expand_as(xhat).clone() if y_t is None else y_t.add_(b_t.reshape(1, d))
        return (y_t if y_t is not None else torch.zeros_like(xhat)).reshape(ctx.x_shape_out)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, b, mean, rstd, xhat = ctx.saved_tensors
        _, need_w, need_b = ctx.needs_input_grad[:3]
        mask = (True, w is not None and need_w, b is not None and need_b)
        building = torch.is_grad_enabled()  # a create_graph backward: the linearisation point
        if not building and not _is_dual(gy):
            # A plain backward (e.g. a matvec's pass back through the forward graph): the native
            # kernel alone; the double backward's constants would never be read.
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(gy, x, ctx.shape, mean, rstd, w, b, list(mask))
            return gx, gw if mask[1] else None, gb if mask[2] else None, None, None
        gx, gw, gb = _LayerNormBackward.apply(gy.contiguous(), x, w, b, mean, rstd, xhat, ctx.shape, mask, building)
        return gx, gw, gb, None, None


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` with the short double backward and forward-over-reverse rules above.

    Args:
        x: ``(..., *normalized_shape)``.
        normalized_shape: trailing dimensions normalised together.
        weight, bias: ``normalized_shape``-shaped affine parameters, or ``None``.
        eps: added to the variance.
    """
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape) :]) != tuple(shape):
        raise ValueError(f"layer_norm: input {tuple(x.shape)} does not end with normalized_shape {tuple(shape)}")
    return _LayerNorm.apply(x, weight, bias, shape, eps)
