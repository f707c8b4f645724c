"""Explicit forward-over-reverse rules for ops whose forward-mode AD is slow in plain autograd.

A forward-over-reverse HVP (:func:`bissl.ops.hvp.hvp`, ``mode="fwdrev"``) runs the backward pass on
dual numbers, so every backward kernel needs a forward-mode (jvp) formula. For a few common ones
PyTorch 2.13 evaluates that formula through a Python decomposition (``prims``), e.g. for dividing
attention scores by a Python number and for the backward of ``log_softmax`` (inside
``cross_entropy``); on the benchmark transformer these rules make a ``fwdrev`` HVP ~9% faster
(2 threads, interleaved A/B). The ``autograd.Function`` s here compute the same values with the
same kernels (bit-identical) and carry short jvp rules:

* ``x / c`` for a Python number ``c``: tangent ``ẋ / c``; its backward is the same op, so it can be
  differentiated in any mode and to any order;
* ``y = log_softmax(x)``: ``ẏ = ẋ − Σ eʸ ẋ``; backward ``gx = gy − eʸ Σ gy`` with jvp
  ``ġx = ġy − eʸ (ẏ Σ gy + Σ ġy)`` (sums over the softmax dimension).

They are meant for :class:`bissl.ops.fast_second_order.FastSecondOrder` in the ``"forward"``
direction; the ``log_softmax`` backward is differentiable once (in forward mode) only.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor


class _DivByNumber(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, c: float):
        ctx.c = c
        return torch.div(x, c)

    @staticmethod
    def jvp(ctx, x_t: Tensor, _c):
        return torch.div(x_t, ctx.c)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _DivByNumber.apply(g, ctx.c), None


def div_by_number(x: Tensor, c: float) -> Tensor:
    """``x / c`` (``c`` a Python number) with a cheap jvp rule at every order."""
    return _DivByNumber.apply(x, c)


def is_plain_number(c: object) -> bool:
    """A real Python number (not a bool, not a tensor)."""
    return isinstance(c, numbers.Real) and not isinstance(c, bool)


class _LogSoftmaxBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy: Tensor, y: Tensor, dim: int):
        ctx.dim = dim
        ctx.save_for_forward(gy, y)
        return torch._log_softmax_backward_data(gy, y, dim, y.dtype)

    @staticmethod
    def jvp(ctx, gy_t: Tensor | None, y_t: Tensor | None, _dim):
        gy, y = ctx.saved_tensors
        p = torch.exp(y)
        coef = gy_t.sum(ctx.dim, keepdim=True) if gy_t is not None else torch.zeros_like(y.narrow(ctx.dim, 0, 1))
        out = -p * (y_t * gy.sum(ctx.dim, keepdim=True) + coef) if y_t is not None else -p * coef
        return out + gy_t if gy_t is not None else out

    @staticmethod
    def backward(ctx, _u):
        raise RuntimeError(
            "log_softmax forward-over-reverse rule: its backward is differentiable in "
            "forward mode only (use it for mode='fwdrev')"
        )


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int):
        y = torch._log_softmax(x, dim, False)
        ctx.dim = dim
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def jvp(ctx, x_t: Tensor, _dim):
        (y,) = ctx.saved_tensors
        return x_t - (torch.exp(y) * x_t).sum(ctx.dim, keepdim=True)

    @staticmethod
    def backward(ctx, gy: Tensor):
        (y,) = ctx.saved_tensors
        return _LogSoftmaxBackward.apply(gy, y, ctx.dim), None


def log_softmax(x: Tensor, dim: int) -> Tensor:
    """``torch.log_softmax(x, dim)`` with the forward-over-reverse rules above."""
    return _LogSoftmax.apply(x, dim)


_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


def reroute_cross_entropy(args: tuple, kwargs: dict) -> Tensor | None:
    """``F.cross_entropy`` as ``nll_loss(log_softmax(input, 1))`` through the rules above — exactly
    what the fused op computes — or ``None`` where that does not apply (probability targets,
    label smoothing, legacy ``size_average``/``reduce`` arguments, non-floating input)."""
    a = dict(zip(_CE_ARGS, args))
    a.update(kwargs)
    x, target = a["input"], a["target"]
    if (
        not x.is_floating_point()
        or x.dim() < 1
        or target.is_floating_point()
        or a.get("label_smoothing", 0.0) != 0.0
        or a.get("size_average") is not None
        or a.get("reduce") is not None
    ):
        return None
    dim = 0 if x.dim() == 1 else 1
    return F.nll_loss(
        log_softmax(x, dim),
        target,
        a.get("weight"),
        ignore_index=a.get("ignore_index", -100),
        reduction=a.get("reduction", "mean"),
    )
