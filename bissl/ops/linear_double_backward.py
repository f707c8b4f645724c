"""``F.linear`` on the reverse-over-reverse HVP path, with graph-only weight gradients.

With ``y = x Wᵀ + b`` (``x``: ``(..., in)``, ``W``: ``(out, in)``) the backward is
``gx = gy W``, ``gW = Σ gyᵀ x``, ``gb = Σ gy`` (sums over the leading dimensions), and its
derivative, for cotangents ``(u_x, u_W, u_b)`` of ``(gx, gW, gb)``, is

* ``∂/∂gy = u_x Wᵀ + x u_Wᵀ + u_b``  (two matrix products: ``linear(u_x, W) + linear(x, u_W, u_b)``);
* ``∂/∂x = gy u_W``;  ``∂/∂W = Σ gyᵀ u_x``.

These are the products autograd's own double backward of ``addmm``/``mm`` runs, so the matvecs cost
the same. What this route adds is the linearised operator's saving that
:mod:`bissl.ops.conv_double_backward` already makes for convolutions: the first-order graph is
built by a ``create_graph`` backward whose weight-gradient *values* are never read (the matvecs
differentiate them, :class:`bissl.ops.hvp.LinearizedHVP`), so inside
:meth:`~bissl.ops.conv_double_backward.WeightGradPolicy.graph_only` the ``gyᵀ x`` product is skipped
and ``gW`` (and ``gb``) is a zero tensor that still carries the exact double backward: a third of a
linear layer's gradient FLOPs saved once per linearisation, the HVP unchanged.

Values are the stock kernels' (``F.linear``); only plain reverse-mode autograd sees this route
(:class:`bissl.ops.fast_second_order.FastSecondOrder`, ``direction="reverse"``). Third derivatives
are not supported. Tested against autograd and dense Hessians in float64
(``tests/ops/test_linear_double_backward.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bissl.ops.conv_double_backward import WeightGradPolicy
from bissl.ops.gelu_double_backward import _third_order_guard


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _LinearBackward(torch.autograd.Function):
    """``(gy, x, W) -> (gx, gW, gb)``, differentiable once."""

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, w: Tensor, has_bias: bool, need_gx: bool, need_gw: bool, gw_values: bool):
        ctx.save_for_backward(gy, x, w)
        # An output no cotangent reaches (e.g. the weight gradient of a projector that is not in θ)
        # arrives as None, not as zeros: its products are skipped instead of run on zeros.
        ctx.set_materialize_grads(False)
        ctx.has_bias = has_bias
        gx = gy @ w if need_gx else None
        if need_gw and gw_values:
            gw = _rows(gy).t() @ _rows(x)
            gb = _rows(gy).sum(0) if has_bias else None
        elif need_gw:
            # Graph-only (module docstring): a zero broadcast to the weight's shape, nothing
            # allocated or written (a fresh zero tensor the size of a large first layer costs its
            # page faults on every linearisation; measured ~6% of the MLP's hypergradient).
            gw = w.new_zeros(()).expand(w.shape)
            gb = gy.new_zeros(()).expand(w.shape[0]) if has_bias else None
        else:
            gw, gb = None, (_rows(gy).sum(0) if has_bias else None)
        return gx, gw, gb

    @staticmethod
    def backward(ctx, u_x: Tensor | None, u_w: Tensor | None, u_b: Tensor | None):
        _third_order_guard("linear double backward")
        gy, x, w = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        d_gy = d_x = d_w = None
        if need_gy:
            if u_x is not None and u_w is not None:
                # Both products into one buffer: the second accumulates in the GEMM (beta = 1)
                # instead of a separate output-sized add (measured ~1.4% of the ViT hypergradient).
                d_gy = F.linear(_rows(x), u_w, u_b if ctx.has_bias else None)
                d_gy = d_gy.addmm_(_rows(u_x), w.t()).view(gy.shape)
            else:
                terms = []
                if u_x is not None:
                    terms.append(F.linear(u_x, w))
                if u_w is not None:
                    terms.append(F.linear(x, u_w, u_b if ctx.has_bias else None))
                elif u_b is not None and ctx.has_bias:
                    terms.append(u_b.expand_as(gy))
                d_gy = sum(terms[1:], terms[0]) if terms else None
        if need_x and u_w is not None:
            d_x = gy @ u_w
        if need_w and u_x is not None:
            d_w = _rows(gy).t() @ _rows(u_x)
        return d_gy, d_x, d_w, None, None, None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, policy: WeightGradPolicy):
        ctx.save_for_backward(x, w)
        ctx.policy = policy
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():
            # A plain backward (a matvec's pass back through the forward graph): the products
            # alone, without a differentiable node's bookkeeping.
            gx = gy @ w if need_x else None
            gw = _rows(gy).t() @ _rows(x) if need_w else None
            gb = _rows(gy).sum(0) if need_b and ctx.has_bias else None
            return gx, gw, gb, None
        gw_values = ctx.policy.weight_grad_values
        gx, gw, gb = _LinearBackward.apply(gy, x, w, ctx.has_bias and need_b, need_x, need_w or need_b, gw_values)
        return gx, (gw if need_w else None), (gb if need_b else None), None


def reroute_linear(args: tuple, kwargs: dict, policy: WeightGradPolicy) -> Tensor | None:
    """``F.linear(*args, **kwargs)`` through :class:`_Linear`, or ``None`` where it does not apply:
    grad disabled, no tensor weight, a 0-d/1-d input, or a weight the policy leaves out
    (:class:`~bissl.ops.conv_double_backward.WeightGradPolicy`). Inputs ``(..., in)`` of any rank
    are rerouted: on the benchmark ViT (``(B, T, in)`` inputs) that made a hypergradient 2.2% faster
    than autograd's own nodes (interleaved A/B, 7 rounds, glibc without mmap), on the MLP (2-D, a
    large first layer) ~25% faster.
    """
    if not torch.is_grad_enabled():
        return None
    a = dict(zip(("input", "weight", "bias"), args))
    a.update(kwargs)
    x, w = a.get("input"), a.get("weight")
    if not isinstance(x, Tensor) or not isinstance(w, Tensor) or x.dim() < 2 or w.dim() != 2:
        return None
    if not policy.reroutes(w):
        return None
    return _Linear.apply(x, w, a.get("bias"), policy)
