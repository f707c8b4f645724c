"""A faster second derivative for ``conv2d`` on the reverse-over-reverse HVP path.

Autograd differentiates a convolution's backward with ``_convolution_double_backward``, which
computes the weight-gradient terms as a convolution with batch and channels swapped. On CPU that
runs through oneDNN at about half the GFLOP/s of a forward convolution and dominates the HVP
(measured, ``docs/method.md`` §5). Every term of the double backward is, however, one of the
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

Channels-last activations. oneDNN convolutions on CPU run on NHWC ("channels_last") activations
without the layout reorders an NCHW tensor costs on every call: measured on the benchmark CNNs
(2 threads), forward and grad-input kernels about 1.6–1.8× faster, grad-weight about 10% slower,
the three together ~25% less time. With ``policy.channels_last`` the rerouted convolution's input
is made channels-last (a differentiable ``contiguous``: a copy only where the input is not already
NHWC, i.e. at the first layer) and so are the cotangents its backward receives; the activations
between layers then stay NHWC by themselves (elementwise ops keep their input's layout). Values
are the same up to float rounding; the weight gradients are returned in the weights' own layout.

Graph-only weight gradients. A linearised HVP differentiates the first-order weight gradients
again but never reads their values. Inside :meth:`WeightGradPolicy.graph_only` (entered by
:class:`bissl.ops.hvp.LinearizedHVP` around its ``create_graph`` backward only, so a loss that
takes gradients of its own is unaffected) the grad-weight kernel is skipped and the
weight (and bias) gradient is a zero tensor that still carries the node's double backward: a third
of a convolution's first backward saved, the HVP unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class _ConvConf:
    __slots__ = ("dilation", "groups", "has_bias", "padding", "policy", "stride")

    def __init__(self, stride, padding, dilation, groups, has_bias, policy: WeightGradPolicy):
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.has_bias, self.policy = groups, has_bias, policy

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, go: Tensor, x: Tensor, w: Tensor, mask: list[bool]):
        bias_sizes = [w.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(
            go,
            x,
            w,
            bias_sizes,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            self.groups,
            mask,
        )


class _Conv2dBackward(torch.autograd.Function):
    """``(grad_out, x, w) -> (grad_x, grad_w, grad_b)``, differentiable once."""

    @staticmethod
    def forward(ctx, go: Tensor, x: Tensor, w: Tensor, conf: _ConvConf, need_gx: bool, need_gw: bool, gw_values: bool):
        ctx.save_for_backward(go, x, w)
        ctx.conf = conf
        # An output no cotangent reaches arrives as None, not as zeros: its kernels are skipped.
        ctx.set_materialize_grads(False)
        # Skip the kernels nobody needs (e.g. the input gradient of the first layer's images).
        if need_gw and not gw_values:
            # Graph-only weight gradient (module docstring): a zero broadcast to the weight's
            # shape, nothing allocated or written.
            gx = conf.backward(go, x, w, [True, False, False])[0] if need_gx else None
            gb = w.new_zeros(()).expand(w.shape[0]) if conf.has_bias else None
            return gx, w.new_zeros(()).expand(w.shape), gb
        gx, gw, gb = conf.backward(go, x, w, [need_gx, need_gw, conf.has_bias])
        # Weight gradients come back in the weight's own layout (module docstring), whatever the
        # kernel chose for channels-last activations: a copy only where the two differ.
        return gx, (gw.contiguous(memory_format=_layout(w)) if gw is not None else None), gb

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
            d_w = conf.backward(go, ggx, w, [False, True, False])[1].contiguous(memory_format=_layout(w))
        return d_go, d_x, d_w, None, None, None, None


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
        # Only a backward that builds a graph (``create_graph``) may leave out the values.
        gw_values = ctx.conf.policy.weight_grad_values or not torch.is_grad_enabled()
        go = go.contiguous(
            memory_format=torch.channels_last if ctx.conf.policy.channels_last else torch.contiguous_format
        )
        gx, gw, gb = _Conv2dBackward.apply(go, x, w, ctx.conf, need_x, need_w, gw_values)
        return gx, gw, (gb if need_b else None), None


def _layout(t: Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        else torch.contiguous_format
    )


class WeightGradPolicy:
    """How rerouted convolutions run; shared by a mode and the graph nodes it creates.

    Attributes:
        weight_grad_values: whether ``create_graph`` backwards compute weight-gradient values
            (see :meth:`graph_only`).
        channels_last: run the convolutions on channels-last activations (module docstring).
        weights: the ``id`` s of the leaf tensors an HVP differentiates (θ), or None to reroute
            every layer. A layer whose weight is a leaf outside them (a projector or head the loss
            closes over: trainable, but not in θ) keeps autograd's own nodes, which know that
            nobody asks for that weight's gradient; a rerouted node only sees ``requires_grad``
            and would compute its second-order terms. Weights computed from θ (slices of a flat
            θ, reparametrised weights) are not leaves and are rerouted.
    """

    __slots__ = ("channels_last", "weight_grad_values", "weights")

    def __init__(self, channels_last: bool = False) -> None:
        self.weight_grad_values = True
        self.channels_last = channels_last
        self.weights: frozenset[int] | None = None

    def reroute_only(self, params: Iterable[Tensor]) -> None:
        """Reroute only layers whose weights are among ``params`` (θ's leaves) or computed from
        them (see ``weights``)."""
        self.weights = frozenset(id(t) for t in params)

    def reroutes(self, weight: object) -> bool:
        """Whether the layer of ``weight`` is rerouted (see ``weights``)."""
        if self.weights is None or not isinstance(weight, Tensor) or not weight.is_leaf:
            return True
        return id(weight) in self.weights

    @contextlib.contextmanager
    def graph_only(self) -> Iterator[None]:
        """While active, ``create_graph`` backwards through convolutions rerouted with this policy
        return zero weight/bias gradients that still carry the exact double backward (module
        docstring). For a caller that differentiates those gradients but never reads them."""
        previous = self.weight_grad_values
        self.weight_grad_values = False
        try:
            yield
        finally:
            self.weight_grad_values = previous


def reroute_conv2d(args: tuple, kwargs: dict, policy: WeightGradPolicy) -> Tensor | None:
    """``F.conv2d(*args, **kwargs)`` through the faster double backward, or ``None`` where it does
    not apply (grad disabled, non-4D input, string padding such as ``"same"``, a weight the
    policy leaves out)."""
    if not torch.is_grad_enabled():
        return None
    a = dict(zip(_CONV_ARGS, args))
    a.update(kwargs)
    x, padding = a["input"], a.get("padding", 0)
    if x.dim() != 4 or isinstance(padding, str) or not policy.reroutes(a["weight"]):
        return None
    conf = _ConvConf(
        a.get("stride", 1), padding, a.get("dilation", 1), a.get("groups", 1), a.get("bias") is not None, policy
    )
    if policy.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # differentiable; no-op when already NHWC
    return _Conv2d.apply(x, a["weight"], a.get("bias"), conf)


class ConvFastDoubleBackward(TorchFunctionMode):
    """Route ``F.conv2d`` (hence ``nn.Conv2d``) through the faster double backward while active.

    Only string-free padding (ints/tuples) is rerouted; ``padding="same"`` and non-4D inputs fall
    back to the stock op. ``policy.graph_only()`` skips weight-gradient values (module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self.policy = WeightGradPolicy()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            out = reroute_conv2d(args, kwargs, self.policy)
            if out is not None:
                return out
        return func(*args, **kwargs)
