"""One ``TorchFunctionMode`` for the HVPs: BatchNorm policy plus ops with cheaper second derivatives.

Inside an HVP a loss is differentiated twice. Autograd's generic second derivatives of a few ops
dominate its cost (measured; see each module's docstring), so while the loss runs this mode
reroutes them to ops with the same values (same kernels, bit-identical) and first derivatives but a
short closed-form second derivative:

* reverse over reverse (``direction="reverse"``: the ``revrev``/``autograd`` HVPs and the
  linearised operator): ``conv2d`` and ``linear`` (:mod:`bissl.ops.conv_double_backward`,
  :mod:`bissl.ops.linear_double_backward`: graph-only weight gradients), train-mode
  ``batch_norm`` (:mod:`bissl.ops.batchnorm_double_backward`), ``gelu`` and ``layer_norm``
  (:mod:`bissl.ops.gelu_double_backward`, :mod:`bissl.ops.layernorm_double_backward`), ``tanh``,
  ``relu``, ``silu`` and ``softmax`` (:mod:`bissl.ops.activation_double_backward`), their
  coefficients stored once per linearisation point;
* forward over reverse (``direction="forward"``, ``torch.autograd.forward_ad``: the ``fwdrev``
  HVP): train-mode ``batch_norm``, ``gelu``, ``layer_norm``, division by a Python number and
  ``cross_entropy`` (:mod:`bissl.ops.fwdrev_rules`), whose jvp rules replace forward-mode AD's
  formulas (or decompositions) for their backward.

It also applies the BatchNorm policy of :mod:`bissl.ops.batchnorm`, so a loss op passes one Python
hook, not two (a few µs per op: it matters for small models). The rerouted ops are plain
``torch.autograd.Function`` s, not for ``torch.func`` transforms (the batched HVP keeps ``vmap``
and the stock ops).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Literal

import torch
import torch.nn.functional as F

from bissl.ops.activation_double_backward import activation, softmax
from bissl.ops.batchnorm import FrozenBatchNormStats
from bissl.ops.conv_double_backward import WeightGradPolicy, reroute_conv2d
from bissl.ops.fwdrev_rules import div_by_number, is_plain_number, reroute_cross_entropy
from bissl.ops.gelu_double_backward import gelu
from bissl.ops.layernorm_double_backward import layer_norm
from bissl.ops.linear_double_backward import reroute_linear

_LN_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")


def _gelu(args: tuple, kwargs: dict):
    a = dict(zip(("input", "approximate"), args))
    a.update(kwargs)
    return gelu(a["input"], a.get("approximate", "none"))


def _layer_norm(args: tuple, kwargs: dict):
    a = dict(zip(_LN_ARGS, args))
    a.update(kwargs)
    return layer_norm(a["input"], a["normalized_shape"], a.get("weight"), a.get("bias"), a.get("eps", 1e-5))


#: The activations with a closed-form double backward (:mod:`bissl.ops.activation_double_backward`).
ACTIVATIONS: tuple[str, ...] = ("tanh", "relu", "silu", "softmax")
#: Those rerouted by default: where autograd's own double backward re-evaluates a transcendental
#: function on every matvec (SiLU's sigmoid). On the benchmark SiLU MLP the route made a
#: linearisation plus five matvecs ~5% faster in both quiet runs; tanh, ReLU and softmax came out
#: within ±2% either way (``benchmarks/bench_fast_paths.py``).
DEFAULT_ACTIVATIONS: tuple[str, ...] = ("silu",)


def activation_set(activations: bool | Collection[str], where: str) -> frozenset[str]:
    """``True`` (all of :data:`ACTIVATIONS`), ``False`` (none) or a collection of their names."""
    if activations is True or activations is False:
        return frozenset(ACTIVATIONS if activations else ())
    if isinstance(activations, str) or not isinstance(activations, Collection):
        raise TypeError(f"{where}: activations must be a bool or a collection of names from {ACTIVATIONS}")
    unknown = sorted(set(activations) - set(ACTIVATIONS))
    if unknown:
        raise ValueError(f"{where}: unknown activation(s) {unknown}; those with a closed form are {ACTIVATIONS}")
    return frozenset(activations)


def _unary(name: str, fields: tuple[str, ...] = ("input",)):
    """Route ``f(x)`` (no in-place flag set) to :func:`~bissl.ops.activation_double_backward.activation`."""

    def route(args: tuple, kwargs: dict):
        a = dict(zip((*fields, "inplace"), args))
        a.update(kwargs)
        x = a.get(fields[0], a.get("self"))
        if a.get("inplace", False) or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        return activation(x, name)

    return route


def _softmax(args: tuple, kwargs: dict):
    a = dict(zip(("input", "dim"), args))
    a.update(kwargs)
    x, dim = a.get("input", a.get("self")), a.get("dim")
    if a.get("dtype") is not None or dim is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    return softmax(x, dim)


def _true_divide(args: tuple, kwargs: dict):
    if (
        len(args) == 2
        and not kwargs
        and isinstance(args[0], torch.Tensor)
        and args[0].is_floating_point()
        and is_plain_number(args[1])
    ):
        return div_by_number(args[0], args[1])
    return None


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (e.g. activation checkpointing) are active.

    Checkpointing recomputes the forward inside the backward, where this mode's routes are not
    taken: the rerouted ops would save other tensors than the recomputation, which checkpointing
    refuses. Under such hooks the stock ops run (same values and derivatives).
    """
    return _top_hooks is not None and _top_hooks(True) is not None


class FastSecondOrder(FrozenBatchNormStats):
    """BatchNorm policy + rerouting to cheaper second derivatives (module docstring).

    Args:
        direction: ``"reverse"`` (reverse over reverse) or ``"forward"`` (forward over reverse).
        conv: reroute ``conv2d`` (reverse only).
        linear: reroute ``linear`` (reverse only).
        batchnorm: train-mode BatchNorm through :func:`~bissl.ops.batchnorm_double_backward.batch_norm_train`
            (closed-form double backward and jvp rules; either direction).
        gelu: reroute ``gelu`` (either direction).
        layernorm: reroute ``layer_norm`` (either direction).
        activations: which of ``tanh``, ``relu``, ``silu`` and ``softmax`` to reroute (reverse
            only): ``True`` (all), ``False`` (none) or their names; default
            :data:`DEFAULT_ACTIVATIONS` (see :mod:`bissl.ops.activation_double_backward`).
        channels_last: run the rerouted convolutions on channels-last activations (reverse only).
        division_and_cross_entropy: reroute ``tensor / number`` and ``cross_entropy`` (forward only).

    Attributes:
        conv_policy: the :class:`~bissl.ops.conv_double_backward.WeightGradPolicy` of the
            rerouted convolutions and linear layers (``conv_policy.graph_only()`` skips
            weight-gradient values).
    """

    def __init__(
        self,
        direction: Literal["reverse", "forward"],
        *,
        conv: bool = True,
        linear: bool = True,
        batchnorm: bool = True,
        gelu: bool = True,
        layernorm: bool = True,
        activations: bool | Collection[str] = DEFAULT_ACTIVATIONS,
        channels_last: bool = False,
        division_and_cross_entropy: bool = True,
    ):
        if direction not in ("reverse", "forward"):
            raise ValueError(f"FastSecondOrder: direction must be 'reverse' or 'forward', got {direction!r}")
        reverse = direction == "reverse"
        super().__init__(fast_double_backward=batchnorm)
        self.conv_policy = WeightGradPolicy(channels_last=channels_last and reverse)
        routes: dict[Callable, Callable] = {}
        if conv and reverse:
            routes[F.conv2d] = lambda args, kwargs: reroute_conv2d(args, kwargs, self.conv_policy)
        if linear and reverse:
            routes[F.linear] = lambda args, kwargs: reroute_linear(args, kwargs, self.conv_policy)
        chosen = activation_set(activations, "FastSecondOrder") if reverse else frozenset()
        f: Callable
        if "tanh" in chosen:
            for f in (torch.tanh, torch.Tensor.tanh):
                routes[f] = _unary("tanh")
        if "relu" in chosen:
            for f in (F.relu, torch.relu, torch.Tensor.relu):
                routes[f] = _unary("relu")
        if "silu" in chosen:
            routes[F.silu] = _unary("silu")
        if "softmax" in chosen:
            for f in (F.softmax, torch.softmax, torch.Tensor.softmax):
                routes[f] = _softmax
        if gelu:
            routes[F.gelu] = _gelu
        if layernorm:
            routes[F.layer_norm] = _layer_norm
        if division_and_cross_entropy and not reverse:
            routes[F.cross_entropy] = reroute_cross_entropy
            for div in (torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide):
                routes[div] = _true_divide
        self._routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self._routes.get(func)
        if route is not None and torch.is_grad_enabled() and not _saved_tensor_hooks_active():
            out = route(args, kwargs)
            if out is not None:
                return out
        return super().__torch_function__(func, types, args, kwargs)
