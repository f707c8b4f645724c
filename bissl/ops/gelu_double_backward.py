"""Second derivatives of ``gelu`` for both HVP paths: a precomputed double backward and jvp rules.

With ``y = gelu(x)``, autograd's backward is ``gx = gy · gelu'(x)``. Its derivatives are, per
element and with ``gelu''`` in closed form,

* double backward (reverse over reverse), for a cotangent ``u`` of ``gx``:
  ``∂/∂gy = u · gelu'(x)``, ``∂/∂x = u · gy · gelu''(x)``;
* forward over reverse, for tangents ``(ġy, ẋ)``: ``ġx = ġy · gelu'(x) + gy · gelu''(x) · ẋ``.

Autograd's own ``GeluBackwardBackward`` re-derives ``gelu'`` and ``gelu''`` (``erf``, ``exp`` and
about ten full-size passes) on every matvec, and forward-mode AD decomposes ``gelu_backward`` into a
similar chain (on the benchmark transformer, the stock double backward made a linearised matvec
~5% slower, interleaved A/B). Here ``gelu'(x)`` is evaluated once, in the forward, and
the set-up that builds the first-order graph stores ``gy · gelu''(x)``: each matvec is two
multiplications (and the plain first backward it also runs through the forward graph is one), and
forward over reverse evaluates ``erf`` once instead of three times. For the exact gelu the
set-up's ``(gy·gelu'(x), gy·gelu''(x))`` is the op ``bissl::gelu_backward_and_curvature`` (a C++
CPU kernel, one pass; :func:`gelu_backward_and_curvature_ref` is its torch default). Values are
bit-identical to ``F.gelu`` (the same kernel); derivatives are the same formulas, evaluated as
products with ``gelu'(x)`` (float rounding may differ). Third derivatives are not supported.

``gelu(x) = x Φ(x)``: ``gelu' = Φ + x φ``, ``gelu'' = φ (2 − x²)``. Tanh approximation,
``gelu = x (1 + t)/2`` with ``t = tanh(k (x + c x³))``, ``k = √(2/π)``, ``c = 0.044715``:
``gelu'' = (1 − t²) (k (1 + 3 c x²) − x t k² (1 + 3 c x²)² + 3 k c x²)``.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = 0.044715


def _third_order_guard(where: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{where}: third derivatives are not supported (the double backward "
            "uses precomputed constants); differentiate at most twice"
        )


def gelu_second_derivative(x: Tensor, approximate: str = "none") -> Tensor:
    """``gelu''(x)`` elementwise (same shape and dtype as ``x``; not differentiable)."""
    if approximate == "tanh":
        x2 = x * x
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * x2)
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _TANH_C * x2 * x))
        return (1.0 - t * t) * (du - x * t * du * du + 3.0 * _SQRT_2_OVER_PI * _TANH_C * x2)
    return torch.exp(-0.5 * x * x).mul_(_INV_SQRT_2PI).mul_(2.0 - x * x)


def gelu_backward_and_curvature_ref(gy: Tensor, x: Tensor, d1: Tensor) -> tuple[Tensor, Tensor]:
    """``(gy · d1, gy · gelu''(x))`` for the exact (erf) gelu, ``d1 = gelu'(x)``: the torch reference
    of ``bissl::gelu_backward_and_curvature`` (all arguments and results the same shape)."""
    return gy * d1, gy * gelu_second_derivative(x)


def _backward_and_curvature(gy: Tensor, x: Tensor, d1: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    """First backward ``gy · gelu'(x)`` and the stored coefficient ``gy · gelu''(x)`` at the point.

    The exact gelu in float32/float64 goes through ``bissl::gelu_backward_and_curvature``: on CPU
    with ``bissl._C`` loaded its C++ kernel (``csrc/cpu/gelu_backward_and_curvature.cpp``, one
    pass where the reference takes eight), elsewhere the reference. The tanh form stays in torch.
    """
    if approximate == "none" and x.dtype in (torch.float32, torch.float64):
        return torch.ops.bissl.gelu_backward_and_curvature(gy.contiguous(), x.contiguous(), d1.contiguous())
    return gy * d1, gy * gelu_second_derivative(x, approximate)


def _gelu_prime(x: Tensor, approximate: str) -> Tensor:
    return torch.ops.aten.gelu_backward(torch.ones_like(x), x, approximate=approximate)


class _GeluBackward(torch.autograd.Function):
    """``(gy, x) -> gy · gelu'(x)``, differentiable once in reverse mode and once in forward mode.

    ``d1 = gelu'(x)`` is a constant of the point. When the first backward builds a graph
    (``build_graph``), the double backward's second coefficient ``gy · gelu''(x)`` is stored too.
    """

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, approximate: str, d1: Tensor, build_graph: bool):
        ctx.approximate = approximate
        ctx.save_for_forward(gy, x, d1)
        if not build_graph:
            return gy * d1
        gx, gy_d2 = _backward_and_curvature(gy, x, d1, approximate)
        ctx.save_for_backward(d1, gy_d2)
        return gx

    @staticmethod
    def backward(ctx, u: Tensor):
        _third_order_guard("gelu double backward")
        if not ctx.saved_tensors:
            raise RuntimeError("gelu double backward: the first backward did not build a graph")
        d1, gy_d2 = ctx.saved_tensors
        return u * d1, u * gy_d2, None, None, None

    @staticmethod
    def jvp(ctx, gy_t: Tensor | None, x_t: Tensor | None, _a, _d1, _b):
        gy, x, d1 = ctx.saved_tensors
        out = gy_t * d1 if gy_t is not None else None
        if x_t is not None:
            term = gelu_second_derivative(x, ctx.approximate).mul_(gy).mul_(x_t)
            out = term if out is None else out.add_(term)
        return out if out is not None else torch.zeros_like(x)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, approximate: str):
        ctx.approximate = approximate
        # gelu'(x) once: the jvp, the first backward and (in a matvec) its plain re-run all use it,
        # where autograd would evaluate erf again each time.
        d1 = _gelu_prime(x, approximate)
        ctx.save_for_backward(x, d1)
        ctx.save_for_forward(d1)
        return torch.ops.aten.gelu(x, approximate=approximate)

    @staticmethod
    def jvp(ctx, x_t: Tensor, _a):
        (d1,) = ctx.saved_tensors
        return x_t * d1

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, d1 = ctx.saved_tensors
        building = torch.is_grad_enabled()  # a create_graph backward: the linearisation point
        if building or _is_dual(gy):
            return _GeluBackward.apply(gy, x, ctx.approximate, d1, building), None
        return gy * d1, None


def _is_dual(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (inside a ``forward_ad.dual_level``)."""
    return fwAD.unpack_dual(t).tangent is not None


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate)`` with the precomputed double backward and forward-over-reverse rule.

    Args:
        x: any shape, floating point.
        approximate: ``"none"`` (erf) or ``"tanh"``, as ``F.gelu``.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _Gelu.apply(x, approximate)
