"""Hessian-vector products of a scalar loss of a parameter dict.

Three ways to compute ``H v`` with ``H = ∇²loss(params)``, equal up to rounding and tested against
each other, against the dense Hessian and against finite differences:

* ``"fwdrev"``: forward over reverse: the parameters become ``torch.autograd.forward_ad`` dual
  tensors (tangent ``v``) and one ``torch.autograd.grad`` pass returns ``∇loss`` whose tangent is
  ``H v``. One forward, one backward, each carrying a tangent: the cheapest single HVP and the one
  with the least memory. Plain autograd rather than ``torch.func.jvp(torch.func.grad(...))``:
  same formulas, less per-op overhead (measured ~20% less CPU time on the benchmark transformer),
  and train-mode BatchNorm, ``gelu``, ``layer_norm``, ``cross_entropy`` and division by a number
  get explicit jvp rules (:mod:`bissl.ops.fast_second_order`).
  Saved-tensor hooks (activation checkpointing) are refused, as ``torch.func`` does.
* ``"revrev"``: reverse over reverse. Its strength is *reuse*: :func:`linearize_hvp` builds the
  first-order graph once and every matvec is one double-backward pass over it, with cheaper
  closed-form second derivatives of ``conv2d``, BatchNorm, ``gelu`` and ``layer_norm``
  (:mod:`bissl.ops.fast_second_order`), and without computing the first-order weight gradients'
  values, which the matvecs never read. That is the default for CG; the one-shot ``hvp`` is that
  operator applied once.
* ``"autograd"``: ``torch.autograd.grad(..., create_graph=True)`` then a second ``grad``,
  recomputed from scratch each call: the BiSSL reference code's recipe on every CG iteration
  (here with the same faster second derivatives; :mod:`bissl.hypergrad.reference` keeps the
  stock one as the benchmark baseline).

``torch.func.linearize`` is deliberately not used: it fails when ``loss_fn`` closes over modules
with trainable parameters (a projector, a head) and its trace costs as much as a whole CG solve.

Every path applies the BatchNorm policy of :mod:`bissl.ops.batchnorm` (train-mode BatchNorm uses
batch statistics; running buffers are never updated by an HVP). ``loss_fn`` must be deterministic
(no dropout sampling) for the HVP to be a fixed linear map; the linearize-once ``revrev`` form is
immune because it evaluates the loss once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal, cast, overload

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.fast_second_order import DEFAULT_ACTIVATIONS, FastSecondOrder
from bissl.ops.flat import AnyVector, FlatSpec, as_form, pieces, unflatten, vector_form, vector_spec
from bissl.typing import LossFn, Params, ParamsLike

HVPMode = Literal["fwdrev", "revrev", "autograd"]
HVP_MODES: tuple[str, ...] = ("fwdrev", "revrev", "autograd")


def _check_mode(mode: str) -> None:
    if mode not in HVP_MODES:
        raise ValueError(f"unknown HVP mode {mode!r}; choose one of {HVP_MODES}")


def _check_scalar(loss: Tensor, where: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{where}: loss_fn must return a scalar tensor, got {shape}")
    return loss


def _check_like(params: ParamsLike, v: ParamsLike, where: str) -> None:
    if set(params) != set(v):
        missing, extra = set(params) - set(v), set(v) - set(params)
        raise ValueError(
            f"{where}: v must have the keys of params (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
        )
    for k, p in params.items():
        if v[k].shape != p.shape:
            raise ValueError(f"{where}: v[{k!r}] has shape {tuple(v[k].shape)}, params[{k!r}] has {tuple(p.shape)}")


def _detached_leaves(params: ParamsLike) -> Params:
    return {k: p.detach().requires_grad_(True) for k, p in params.items()}


def _create_graph_grads(loss: Tensor, leaves: Params) -> tuple[Tensor, ...]:
    grads = torch.autograd.grad(loss, tuple(leaves.values()), create_graph=True, allow_unused=True)
    # A parameter the loss does not use has a zero gradient and a zero Hessian row.
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves.values()))


def _grad_with_graph(loss_fn: LossFn, leaves: Params) -> tuple[Tensor, tuple[Tensor, ...]]:
    loss = _check_scalar(loss_fn(leaves), "hvp")
    return loss, _create_graph_grads(loss, leaves)


def _second_backward(grads: tuple[Tensor, ...], leaves: Params, v: ParamsLike, retain: bool) -> Params:
    pairs = [(g, v[k]) for k, g in zip(leaves, grads) if g.requires_grad]
    hv: tuple[Tensor | None, ...] = (None,) * len(leaves)
    if pairs:
        gs, vs = zip(*pairs)
        hv = torch.autograd.grad(gs, tuple(leaves.values()), vs, retain_graph=retain, allow_unused=True)
    return {k: torch.zeros_like(p) if h is None else h for (k, p), h in zip(leaves.items(), hv)}


_NO_SAVED_TENSOR_HOOKS = (
    "hvp(mode='fwdrev'): saved-tensor hooks (e.g. activation checkpointing) are not "
    "supported under forward-over-reverse; use mode='revrev'"
)


def _forward_over_reverse(loss_fn: LossFn, primals: Params, tangents: Params) -> Params:
    """``H v`` as the tangent of ``∇loss`` with dual-number parameters (module docstring).

    A few backward kernels have no forward-AD formula in plain autograd (e.g. ``group_norm``'s)
    while ``torch.func`` decomposes them; for those the same product comes from
    ``torch.func.jvp(torch.func.grad(loss_fn))``.
    """
    try:
        return _dual_number_hvp(loss_fn, primals, tangents)
    except NotImplementedError as err:
        if "forward AD" not in str(err):
            raise
    with batchnorm_stats_frozen():
        return torch.func.jvp(torch.func.grad(loss_fn), (primals,), (tangents,))[1]


def _dual_number_hvp(loss_fn: LossFn, primals: Params, tangents: Params) -> Params:
    with (
        fwAD.dual_level(),
        torch.enable_grad(),
        FastSecondOrder("forward"),
        torch.autograd.graph.disable_saved_tensors_hooks(_NO_SAVED_TENSOR_HOOKS),
    ):
        leaves = _detached_leaves(primals)
        duals = {k: fwAD.make_dual(p, tangents[k]) for k, p in leaves.items()}
        loss = _check_scalar(loss_fn(duals), "hvp")
        grads = torch.autograd.grad(loss, tuple(leaves.values()), allow_unused=True)
        tangent_of = (None if g is None else fwAD.unpack_dual(g).tangent for g in grads)
        # A parameter whose gradient does not move with v (or that the loss does not use) has a
        # zero Hessian row.
        return {k: torch.zeros_like(p) if t is None else t for (k, p), t in zip(leaves.items(), tangent_of)}


def hvp(loss_fn: LossFn, params: AnyVector, v: AnyVector, *, mode: HVPMode = "fwdrev") -> AnyVector:
    """Hessian-vector product ``∇²loss_fn(params) · v``.

    Args:
        loss_fn: ``loss_fn(params) -> Tensor`` of shape ``()``. May close over live modules whose
            parameters require grad (they are treated as constants).
        params: point of evaluation: ``{name: Tensor}``, a tuple/list of tensors or a flat tensor
            (``loss_fn`` receives that form).
        v: direction, laid out like ``params`` (any form).
        mode: ``"fwdrev"`` (default), ``"revrev"`` or ``"autograd"`` (see module docstring).

    Returns:
        ``H v`` in ``params``' form, detached from any graph.

    Example:
        >>> Hv = hvp(lambda p: (p["w"] ** 4).sum(), {"w": torch.ones(3)}, {"w": torch.ones(3)})
        >>> Hv["w"]   # 12·w²·v
        tensor([12., 12., 12.])
    """
    _check_mode(mode)
    named_loss, named, spec, form = as_named(loss_fn, params, "hvp")
    if form == "dict":
        v_dict = cast(ParamsLike, v)  # _check_like raises unless it is a dict like params
        _check_like(cast(ParamsLike, params), v_dict, "hvp")
        parts = [v_dict[k] for k in spec.names]
    else:
        parts = pieces(v, spec, "hvp: v", form)
        if form == "flat":
            parts = [torch.cat(parts)]
    primals = {k: p.detach() for k, p in named.items()}
    tangents = {k: t.detach().view(shape) for k, shape, t in zip(spec.names, spec.shapes, parts)}
    out = _hvp_named(named_loss, primals, tangents, mode)
    return (
        as_form(torch.cat([t.reshape(-1) for t in out.values()]), spec, form)
        if form == "flat"
        else (out if form == "dict" else (tuple if form == "tuple" else list)(out.values()))
    )


def _hvp_named(loss_fn: Callable[[Params], Tensor], primals: Params, tangents: Params, mode: str) -> Params:
    """``H v`` on detached dicts (the three modes of the module docstring)."""
    if mode == "fwdrev":
        out = _forward_over_reverse(loss_fn, primals, tangents)
    elif mode == "revrev":
        op = LinearizedHVP(loss_fn, primals, "revrev", True, True, True, need_grad=False)
        out = dict(zip(op.spec.names, op.hv_pieces(tangents)))
    else:
        with torch.enable_grad(), FastSecondOrder("reverse") as fast:
            leaves = _detached_leaves(primals)
            fast.conv_policy.reroute_only(leaves.values())
            _, grads = _grad_with_graph(loss_fn, leaves)
        with torch.enable_grad():
            out = _second_backward(grads, leaves, tangents, retain=False)
    return {k: t.detach() for k, t in out.items()}


def hvp_batched(loss_fn: LossFn, params: ParamsLike, vs: ParamsLike, *, mode: HVPMode = "fwdrev") -> Params:
    """Hessian times k vectors at once: ``vs[name]`` has shape ``(k, *params[name].shape)``.

    ``fwdrev`` and ``revrev`` vectorise over k with ``torch.func.vmap`` (one batched pass);
    ``autograd`` uses ``is_grads_batched``. Returns ``{name: (k, ...)}``.
    """
    _check_mode(mode)
    first = next(iter(vs.values()))
    k = first.shape[0] if first.dim() > 0 else 0
    for name, p in params.items():
        if name not in vs or vs[name].shape != (k, *p.shape):
            got = tuple(vs[name].shape) if name in vs else None
            raise ValueError(f"hvp_batched: vs[{name!r}] must have shape {(k, *p.shape)}, got {got}")
    primals = {kk: p.detach() for kk, p in params.items()}
    tangents = {kk: t.detach() for kk, t in vs.items()}
    with batchnorm_stats_frozen():
        if mode == "fwdrev":
            one = lambda t: torch.func.jvp(torch.func.grad(loss_fn), (primals,), (t,))[1]  # noqa: E731
            out = torch.func.vmap(one)(tangents)
        elif mode == "revrev":
            vjp_fn = torch.func.vjp(torch.func.grad(loss_fn), primals)[1]
            out = torch.func.vmap(lambda t: vjp_fn(t)[0])(tangents)
        else:
            with torch.enable_grad():
                leaves = _detached_leaves(primals)
                _, grads = _grad_with_graph(loss_fn, leaves)
                used = [(g, kk) for g, kk in zip(grads, leaves) if g.requires_grad]
                out = {kk: torch.zeros_like(t) for kk, t in tangents.items()}
                if used:
                    gs, names = zip(*used)
                    hv = torch.autograd.grad(
                        gs,
                        tuple(leaves.values()),
                        tuple(tangents[n] for n in names),
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                    out = {kk: torch.zeros_like(tangents[kk]) if h is None else h for kk, h in zip(leaves, hv)}
    return {kk: t.detach() for kk, t in out.items()}


def as_named(
    loss_fn: Callable, params: AnyVector, where: str
) -> tuple[Callable[[Params], Tensor], Params, FlatSpec, str]:
    """A loss of a vector in any form, restated on a ``{name: Tensor}`` dict.

    Returns ``(loss_of_dict, params_as_dict, spec, form)``: the dict's names are ``spec.names``
    (a tuple's ``"0"``, ``"1"``, ...; a flat tensor's single ``""``) and ``loss_of_dict(d)`` calls
    ``loss_fn`` with ``d`` in the caller's form, so every HVP path works on dicts only.
    """
    form, spec = vector_spec(params, where)
    if isinstance(params, Mapping):  # form "dict"
        return loss_fn, dict(params), spec, form
    named = dict(zip(spec.names, [params] if form == "flat" else params))
    if form == "flat":
        return (lambda d: loss_fn(d[""])), named, spec, form
    if form == "tuple":
        return (lambda d: loss_fn(tuple(d.values()))), named, spec, form
    return (lambda d: loss_fn(list(d.values()))), named, spec, form


class LinearizedHVP:
    """``v ↦ H v`` at a fixed point, set up once and applied many times.

    Build with :func:`linearize_hvp`. Attributes: ``spec`` (layout of the flat vectors), ``form``
    (``"dict"``, ``"tuple"``, ``"list"`` or ``"flat"``: that of the parameters it was built at),
    ``loss`` (0-dim, detached), ``grad`` (``(P,)`` flat gradient at the point, detached; ``None``
    when built with ``need_grad=False``) and ``num_matvecs``. Call it (or ``.matvec``) with a vector
    in any form laid out like the parameters; :meth:`matvec_dict` takes a dict.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: AnyVector,
        mode: HVPMode,
        fast_conv: bool,
        fast_bn: bool,
        fast_gelu_layernorm: bool = True,
        need_grad: bool = True,
        fast_activations: bool | Collection[str] = DEFAULT_ACTIVATIONS,
        channels_last: bool = False,
        fast_linear: bool = True,
    ):
        _check_mode(mode)
        self.mode = mode
        named_loss, named, self.spec, self.form = as_named(loss_fn, params, "linearize_hvp")
        self.num_matvecs = 0
        self._loss_fn = named_loss
        self._primals = {k: p.detach() for k, p in named.items()}
        self.grad: Tensor | None = None
        if mode == "revrev":
            # Build the first-order graph once; every matvec is one double backward over it.
            fast = FastSecondOrder(
                "reverse",
                conv=fast_conv,
                linear=fast_linear,
                batchnorm=fast_bn,
                gelu=fast_gelu_layernorm,
                layernorm=fast_gelu_layernorm,
                activations=fast_activations,
                channels_last=channels_last,
            )
            with torch.enable_grad(), fast:
                self._leaves = _detached_leaves(self._primals)
                fast.conv_policy.reroute_only(self._leaves.values())
                loss = _check_scalar(named_loss(self._leaves), "linearize_hvp")
                # The matvecs differentiate the gradient but never read it: unless the caller
                # wants it, skip computing the convolutions' and linear layers' weight gradients
                # (graph only).
                with contextlib.nullcontext() if need_grad else fast.conv_policy.graph_only():
                    self._grads = _create_graph_grads(loss, self._leaves)
            self.loss = loss.detach()
            if need_grad:
                self.grad = torch.cat([g.detach().reshape(-1) for g in self._grads])
        else:
            # Forward-mode tangents cannot be replayed without re-running the function, and the
            # "autograd" mode reproduces the reference (recompute everything per matvec).
            with torch.enable_grad(), batchnorm_stats_frozen():
                leaves = _detached_leaves(self._primals)
                loss = _check_scalar(named_loss(leaves), "linearize_hvp")
                grads = torch.autograd.grad(loss, tuple(leaves.values()), allow_unused=True) if need_grad else None
            self.loss = loss.detach()
            if grads is not None:  # need_grad
                self.grad = torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(leaves.values(), grads)]
                )

    def hv_pieces(self, v: AnyVector) -> list[Tensor]:
        """``H v`` as one tensor per parameter (autograd's own outputs: nothing is copied).

        ``v`` may be any form laid out like the parameters (e.g. views of a solver's flat buffer).
        """
        if isinstance(v, Tensor):
            if v.dim() != 1 or v.numel() != self.spec.numel:
                raise ValueError(
                    f"LinearizedHVP: expected a flat vector of {self.spec.numel} elements, got {tuple(v.shape)}"
                )
            vd = unflatten(v.detach(), self.spec)
        else:
            parts = pieces(v, self.spec, "LinearizedHVP: v", self.form)
            if self.form == "flat":  # any pieces adding up to P: the one flat parameter
                parts = [torch.cat(parts)]
            vd = {name: t.detach().view(shape) for name, shape, t in zip(self.spec.names, self.spec.shapes, parts)}
        self.num_matvecs += 1
        if self.mode == "revrev":
            with torch.enable_grad():
                out = _second_backward(self._grads, self._leaves, vd, retain=True)
        else:
            out = _hvp_named(self._loss_fn, self._primals, vd, self.mode)
        return list(out.values())

    @overload
    def matvec(self, v: Tensor, *, out: Tensor | None = None) -> Tensor: ...

    @overload
    def matvec(self, v: Mapping[str, Tensor], *, out: Tensor | None = None) -> Params: ...

    @overload
    def matvec(self, v: Sequence[Tensor], *, out: Tensor | None = None) -> Sequence[Tensor]: ...

    def matvec(self, v: AnyVector, *, out: Tensor | None = None) -> AnyVector:
        """``H v`` in ``v``'s form: a flat ``(P,)`` ``v`` gives a flat result (one copy of the
        per-parameter products, into ``out`` when given), a dict or tuple/list gives the same form
        (no copy)."""
        form = vector_form(v, "LinearizedHVP")
        parts = self.hv_pieces(v)
        if form == "flat":
            flat = [t.reshape(-1) for t in parts]
            return torch.cat(flat, out=out) if out is not None else torch.cat(flat)
        named = dict(zip(self.spec.names, parts))
        if form == "dict":
            return named
        return tuple(parts) if form == "tuple" else parts

    __call__ = matvec

    def matvec_dict(self, v: ParamsLike) -> Params:
        """``H v`` for a dict ``v`` shaped like the params."""
        return self.matvec(dict(v))


def linearize_hvp(
    loss_fn: LossFn,
    params: AnyVector,
    *,
    mode: HVPMode = "revrev",
    fast_conv: bool = True,
    fast_bn: bool = True,
    fast_gelu_layernorm: bool = True,
    need_grad: bool = True,
    fast_activations: bool | Collection[str] = DEFAULT_ACTIVATIONS,
    channels_last: bool = False,
    fast_linear: bool = True,
) -> LinearizedHVP:
    """Set up ``v ↦ ∇²loss_fn(params)·v`` once for many matvecs (a CG solve).

    Args:
        loss_fn: scalar loss of the parameters (may close over trainable modules).
        params: the point ``θ``: a ``{name: Tensor}`` dict, a tuple/list of tensors or a flat
            ``(P,)`` tensor (``loss_fn`` receives that form); detached internally.
        mode: ``"revrev"`` (default: first-order graph built once, one double backward per matvec),
            ``"fwdrev"`` (``jvp(grad)`` per matvec: no state kept, re-runs forward and backward) or
            ``"autograd"`` (reference behaviour, recomputes everything per matvec).
        fast_conv: on the ``revrev`` path, route ``conv2d``'s double backward through the
            convolution backward kernels (:mod:`bissl.ops.conv_double_backward`).
        fast_bn: on the ``revrev`` path, give train-mode BatchNorm its closed-form double backward
            (:mod:`bissl.ops.batchnorm_double_backward`).
        fast_gelu_layernorm: on the ``revrev`` path, store ``gelu``'s and ``layer_norm``'s
            second-derivative coefficients once (:mod:`bissl.ops.gelu_double_backward`,
            :mod:`bissl.ops.layernorm_double_backward`).
        channels_last: on the ``revrev`` path with ``fast_conv``, run the convolutions on
            channels-last activations (:mod:`bissl.ops.conv_double_backward`). Default off: on
            2-core CPUs it made the BatchNorm networks' solve work slower and the tanh/ReLU CNN's
            a few percent faster or slower (``benchmarks/bench_fast_paths.py``); measure your
            network.
        fast_linear: on the ``revrev`` path, route ``linear`` through
            :mod:`bissl.ops.linear_double_backward` (graph-only weight gradients when ``need_grad``
            is False).
        fast_activations: on the ``revrev`` path, which of ``tanh``, ``relu``, ``silu`` and
            ``softmax`` get their closed-form double backwards
            (:mod:`bissl.ops.activation_double_backward`): ``True`` (all), ``False`` (none) or
            their names. Default ``("silu",)``: the one measured faster than autograd's own
            (:data:`bissl.ops.fast_second_order.DEFAULT_ACTIVATIONS`).
        need_grad: also return the gradient at the point as ``.grad`` (default). ``False`` (what
            :func:`bissl.hypergrad.implicit_hypergrad` uses) leaves ``.grad`` as ``None`` and lets the
            ``revrev`` set-up skip the convolutions' weight-gradient kernels, whose values the
            matvecs never read (:mod:`bissl.ops.conv_double_backward`).

    Returns:
        A :class:`LinearizedHVP`; ``op(v) -> H v`` in ``v``'s form (flat ``(P,)``, dict or
        tuple/list); ``op.hv_pieces(v)`` gives autograd's per-parameter products without a copy.
    """
    return LinearizedHVP(
        loss_fn,
        params,
        mode,
        fast_conv,
        fast_bn,
        fast_gelu_layernorm,
        need_grad,
        fast_activations,
        channels_last,
        fast_linear,
    )
