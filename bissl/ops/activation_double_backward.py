"""Closed-form double backwards of ``tanh``, ``relu``, ``silu`` and ``softmax`` for the linearised HVP.

A linearised HVP (:class:`bissl.ops.hvp.LinearizedHVP`) differentiates one fixed first-order graph
again on every matvec. For an elementwise activation ``y = f(x)`` autograd's backward is
``gx = gy · f'(x)``, and the double backward, for a cotangent ``u`` of ``gx``, is

    ``∂/∂gy = u · f'(x)``,   ``∂/∂x = u · gy · f''(x)``.

Both coefficients are constants of the linearisation point. Autograd re-derives them on every
matvec: ``tanh``'s ``TanhBackwardBackward`` recomputes ``1 − y²`` and ``−2 y gy`` and then sends
the ``y``-cotangent through ``tanh``'s own backward again (about five activation-sized kernels);
``silu``'s recomputes the sigmoid; ``relu``'s materialises a zero tensor for ``∂/∂x``
(``f'' = 0``) and adds it into the pre-activation's gradient. Here the forward evaluates ``f'(x)``
once, the backward that builds the first-order graph (``create_graph``) stores ``gy · f''(x)``, and
each matvec is two multiplications (one for ``relu``, whose ``∂/∂x`` is not formed at all).

Softmax along ``dim`` (``y = softmax(x)``, ``gx = y ⊙ (gy − s)``, ``s = Σ gy ⊙ y``): for a cotangent
``u`` of ``gx``, with row sums ``t = Σ u ⊙ y`` and ``w = Σ u ⊙ gx``,

    ``∂/∂gy = y ⊙ (u − t)``,   ``∂/∂x = gx ⊙ (u − t) − y ⊙ w``,

where ``gx`` is stored once; autograd's ``softmax_double_backward`` forms the ``y``-cotangent and
then runs it through softmax's backward again.

Measured (``benchmarks/bench_fast_paths.py``: a linearisation plus five matvecs, interleaved, two
quiet runs; the README's fast-path table): the SiLU MLP's solve work is about 5% faster with the
SiLU route (autograd's own re-evaluates the sigmoid on every matvec); tanh and ReLU (the
no-BatchNorm CNN) and softmax (the ViT) come out within about 2% either way, since their stock
double backwards are already short and storing the coefficients costs kernels at the
linearisation. So :class:`~bissl.ops.fast_second_order.FastSecondOrder` and
:func:`~bissl.ops.hvp.linearize_hvp` reroute SiLU by default and the others on request
(``fast_activations=True`` or a tuple of names). Values and first derivatives use the stock
kernels (bit-identical); second derivatives are the same formulas evaluated differently (float
rounding). Only plain reverse-mode autograd sees these Functions
(:class:`bissl.ops.fast_second_order.FastSecondOrder` with ``direction="reverse"``); third
derivatives are not supported. Tested against autograd in float64
(``tests/ops/test_activation_double_backward.py``).

``tanh``: ``f' = 1 − y²``, ``f'' = −2 y (1 − y²)``. ``silu`` (``σ`` the sigmoid):
``f' = σ (1 + x (1 − σ))``, ``f'' = σ (1 − σ) (2 + x (1 − 2σ))``. ``relu``: ``f' = [x > 0]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bissl.ops.gelu_double_backward import _third_order_guard


def _tanh_coefficients(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    return (1.0 - y * y,)


def _tanh_d2(x: Tensor, y: Tensor, d1: Tensor) -> Tensor:
    return (-2.0 * y) * d1


def _silu_coefficients(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    sig = torch.sigmoid(x)
    return sig * (1.0 + x * (1.0 - sig)), sig


def _silu_d2(x: Tensor, y: Tensor, d1: Tensor, sig: Tensor) -> Tensor:
    return sig * (1.0 - sig) * (2.0 + x * (1.0 - 2.0 * sig))


def _relu_coefficients(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    return ((x > 0).to(x.dtype),)


#: name -> (aten forward, ``(x, y) -> (f'(x), *extras)``, ``(x, y, f'(x), *extras) -> f''(x)`` or
#: ``None`` where ``f'' = 0``). The second derivative is only formed by a ``create_graph`` backward.
_ACTIVATIONS: dict[
    str, tuple[Callable[[Tensor], Tensor], Callable[..., tuple[Tensor, ...]], Callable[..., Tensor] | None]
] = {
    "tanh": (torch.ops.aten.tanh, _tanh_coefficients, _tanh_d2),
    "silu": (torch.ops.aten.silu, _silu_coefficients, _silu_d2),
    "relu": (torch.ops.aten.relu, _relu_coefficients, None),
}


class _ActivationBackward(torch.autograd.Function):
    """``(gy, x) -> gy · f'(x)``, differentiable once; ``gy · f''(x)`` stored when building a graph.

    ``point`` is ``(x, y, f'(x), *extras)``, detached and passed in a tuple: only ``gy`` and ``x``
    are differentiated through.
    """

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, point: tuple[Tensor, ...], name: str):
        ctx.name = name
        d2 = _ACTIVATIONS[name][2]
        d1 = point[2]
        ctx.save_for_backward(d1, gy * d2(*point) if d2 is not None else None)
        return gy * d1

    @staticmethod
    def backward(ctx, u: Tensor):
        _third_order_guard(f"{ctx.name} double backward")
        d1, gy_d2 = ctx.saved_tensors
        d_gy = u * d1 if ctx.needs_input_grad[0] else None
        d_x = u * gy_d2 if gy_d2 is not None and ctx.needs_input_grad[1] else None
        return d_gy, d_x, None, None


class _Activation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str):
        op, coefficients, _ = _ACTIVATIONS[name]
        y = op(x)
        ctx.name = name
        # Everything the backward reads goes through save_for_backward, the output ``y`` included:
        # a ctx attribute holding ``y`` (e.g. a closure over it) forms a reference cycle through
        # ``y.grad_fn`` that kept every linearisation's graph alive (tests/ops/test_graph_freed.py).
        ctx.save_for_backward(x, y, *coefficients(x, y))
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, y, d1, *extras = ctx.saved_tensors
        if torch.is_grad_enabled():  # a create_graph backward: the linearisation point
            point = (x.detach(), y.detach(), d1, *extras)
            return _ActivationBackward.apply(gy, x, point, ctx.name), None
        return gy * d1, None


def activation(x: Tensor, name: str) -> Tensor:
    """``tanh``/``silu``/``relu`` of ``x`` with the precomputed double backward (module docstring)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _Activation.apply(x, name)


class _SoftmaxBackward(torch.autograd.Function):
    """``(gy, x) -> y ⊙ (gy − Σ gy ⊙ y)`` by the native kernel (``y`` a constant of the point),
    differentiable once; ``∂/∂x`` is returned on ``x`` directly (module docstring)."""

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, y: Tensor, dim: int):
        gx = torch.ops.aten._softmax_backward_data(gy, y, dim, y.dtype)
        ctx.dim = dim
        ctx.save_for_backward(y, gx)
        return gx

    @staticmethod
    def backward(ctx, u: Tensor):
        _third_order_guard("softmax double backward")
        y, gx = ctx.saved_tensors
        dim = ctx.dim
        u_t = u - (u * y).sum(dim, keepdim=True)
        d_gy = y * u_t if ctx.needs_input_grad[0] else None
        d_x = (gx * u_t).sub_(y * (u * gx).sum(dim, keepdim=True)) if ctx.needs_input_grad[1] else None
        return d_gy, d_x, None, None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int):
        y = torch.ops.aten._softmax(x, dim, False)
        ctx.dim = dim
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # a create_graph backward: the linearisation point
            return _SoftmaxBackward.apply(gy, x, y.detach(), ctx.dim), None
        return torch.ops.aten._softmax_backward_data(gy, y, ctx.dim, y.dtype), None


def softmax(x: Tensor, dim: int) -> Tensor:
    """``softmax(x, dim)`` with the closed-form double backward (module docstring)."""
    return _Softmax.apply(x, dim)
