"""A faster second derivative for ``conv2d`` on the reverse-over-reverse HVP path.

Autograd differentiates a convolution's backward with ``_convolution_double_backward``, which
computes the weight-gradient terms as a convolution with batch and channels swapped. On CPU that
runs through oneDNN at about half the GFLOP/s of a forward convolution and dominates the HVP
(measured in ``shared/REFERENCE.md``). Every term of the double backward is, however, one of the
three kernels a convolution already has, with other arguments:

* ``∂/∂ grad_out``: ``conv(ggx, w) + conv(x, ggw) + ggb`` — forward convolutions;
* ``∂/∂ x``: the grad-input kernel applied to ``(grad_out, ggw)``;
* ``∂/∂ w``: the grad-weight kernel applied to ``(grad_out, ggx)``.

:class:`ConvFastDoubleBackward` is a ``TorchFunctionMode`` that routes ``F.conv2d`` through an
``autograd.Function`` whose backward is itself an ``autograd.Function`` built on
``aten.convolution_backward``; its backward (the double backward) uses the kernels above. Values
are identical up to float rounding; only plain autograd (not ``torch.func``) sees it, so it is used
by the linearize-once ``revrev`` HVP, which is the only path that differentiates a backward pass
with ``torch.autograd``. Third derivatives are not supported (they are never needed for an HVP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class _ConvConf:
    __slots__ = ("stride", "padding", "dilation", "groups", "has_bias")

    def __init__(self, stride, padding, dilation, groups, has_bias):
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.has_bias = groups, has_bias

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, go: Tensor, x: Tensor, w: Tensor, mask: list[bool]):
        bias_sizes = [w.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(
            go, x, w, bias_sizes, self.stride, self.padding, self.dilation,
            False, [0, 0], self.groups, mask,
        )


class _Conv2dBackward(torch.autograd.Function):
    """``(grad_out, x, w) -> (grad_x, grad_w, grad_b)``, differentiable once."""

    @staticmethod
    def forward(ctx, go: Tensor, x: Tensor, w: Tensor, conf: _ConvConf, need_gx: bool, need_gw: bool):
        ctx.save_for_backward(go, x, w)
        ctx.conf = conf
        # Skip the kernels nobody needs (e.g. the input gradient of the first layer's images).
        gx, gw, gb = conf.backward(go, x, w, [need_gx, need_gw, conf.has_bias])
        return gx, gw, gb

    @staticmethod
    def backward(ctx, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None):
        go, x, w = ctx.saved_tensors
        conf: _ConvConf = ctx.conf
        need_go, need_x, need_w = ctx.needs_input_grad[:3]
        d_go = d_x = d_w = None
        if need_go:
            terms = []
            if ggx is not None:
                terms.append(conf.conv(ggx, w))
            if ggw is not None:
                terms.append(conf.conv(x, ggw))
            if ggb is not None and conf.has_bias:
                terms.append(ggb.view(1, -1, 1, 1).expand_as(go))
            d_go = sum(terms[1:], terms[0]) if terms else None
        if need_x and ggw is not None:
            d_x = conf.backward(go, x, ggw, [True, False, False])[0]
        if need_w and ggx is not None:
            d_w = conf.backward(go, ggx, w, [False, True, False])[1]
        return d_go, d_x, d_w, None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, conf: _ConvConf):
        ctx.save_for_backward(x, w)
        ctx.conf = conf
        return conf.conv(x, w, b)

    @staticmethod
    def backward(ctx, go: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = _Conv2dBackward.apply(go.contiguous(), x, w, ctx.conf, need_x, need_w)
        return gx, gw, (gb if need_b else None), None


class ConvFastDoubleBackward(TorchFunctionMode):
    """Route ``F.conv2d`` (hence ``nn.Conv2d``) through the faster double backward while active.

    Only string-free padding (ints/tuples) is rerouted; ``padding="same"`` and non-4D inputs fall
    back to the stock op.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and torch.is_grad_enabled():
            a = dict(zip(_CONV_ARGS, args))
            a.update(kwargs)
            x, w = a["input"], a["weight"]
            padding = a.get("padding", 0)
            if x.dim() == 4 and not isinstance(padding, str):
                conf = _ConvConf(a.get("stride", 1), padding, a.get("dilation", 1),
                                 a.get("groups", 1), a.get("bias") is not None)
                return _Conv2d.apply(x, w, a.get("bias"), conf)
        return func(*args, **kwargs)
