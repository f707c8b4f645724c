"""Every ``bissl::`` fused vector op, declared once: schema, fake kernel and torch "default" impl.

This module is THE dispatch point of the fused ops. Each op gets

* one schema (``torch.library.define``); the C++ (``csrc/cpu``) and CUDA (``csrc/cuda``) kernels
  register against these schemas with ``TORCH_LIBRARY_IMPL(bissl, CPU|CUDA, m)`` and never
  define their own;
* a fake (meta) kernel, so the ops trace under ``torch.compile`` / FakeTensor;
* the plain-torch reference of :mod:`bissl.ops.reference` as the ``"default"`` impl
  (CompositeExplicitAutograd): it answers on every device that has no kernel of its own, and a
  device kernel registered later (CPU by ``bissl._C``, CUDA by :mod:`bissl.ops._backends`) wins
  on that device.

Which backend actually runs, and how an explicit ``backend=`` request bypasses the dispatcher, is
decided in :mod:`bissl.ops._backends`. The ops are leaves: they take flat ``(P,)`` buffers outside
autograd (no autograd or forward-mode rule is registered; a custom op cannot have the latter).

Op contracts (all vectors flat ``(P,)``, one dtype/device; ``alpha``/``beta`` 0-dim tensors):

* ``damped_matvec(hv, v, scale, shift) -> (Av, vAv)``: ``Av = scale·hv + shift·v``, ``vAv = vᵀAv``.
* ``cg_step_(x!, r!, p, ap, alpha) -> rr``: ``x += α p``, ``r -= α Ap``, ``rr = rᵀr`` (new r).
* ``cg_direction_(p!, r, beta) -> ()``: ``p = r + β p``.
* ``prox_grad(grad, theta, phi, lam) -> g``: ``g = grad + λ (θ − φ)``.
* ``axpby(a, x, b, y) -> z``: ``z = a·x + b·y``.

More ops have a C++ CPU kernel and the torch reference only (:data:`CPU_SCHEMAS`; no Triton or
CUDA kernel, so they are not among :data:`OP_NAMES`, the ops every backend provides):

* ``damped_into_(out!, hv[], v, scale, shift) -> vAv``: ``out = scale·cat(hv) + shift·v`` with
  ``hv`` given as its pieces (a matvec's per-parameter results, read where they lie), ``vAv = vᵀout``
  (the CPU solvers' epilogue, :mod:`bissl.ops.damped_into`).
* ``damped_into_blocks_(out!, hv[], v, scale, shift, offsets) -> vAv[]``,
  ``cg_step_blocks_(x!, r!, p, ap, alpha, offsets) -> rr[]``,
  ``cg_direction_blocks_(p!, r, beta, offsets) -> ()``: ``damped_into_``, ``cg_step_`` and
  ``cg_direction_`` on every block ``[offsets[k], offsets[k+1])`` at once, with one step size and one
  dot product per block (layer-wise CG, :func:`bissl.solvers.cg_layerwise_solve`).
* ``layer_norm_double_backward(u, c_w?, c_b?, gy, xhat, s, gx, m_gxh, w?) -> (d_gy, d_x, d_w)``:
  the double backward of ``layer_norm``'s first backward on ``(M, D)`` rows, the formulas and
  reference of :mod:`bissl.ops.layernorm_double_backward` (``d_w`` is ``(0,)`` without ``w``).
* ``gelu_backward_and_curvature(gy, x, d1) -> (gx, gy_d2)``: ``gx = gy·d1`` and
  ``gy_d2 = gy·gelu''(x)`` for the exact gelu at a linearisation point
  (:mod:`bissl.ops.gelu_double_backward`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bissl.ops import reference as ref
from bissl.ops.gelu_double_backward import gelu_backward_and_curvature_ref
from bissl.ops.layernorm_double_backward import layer_norm_double_backward_ref

NAMESPACE = "bissl"

#: Op name -> schema. ``(a!)`` marks arguments updated in place.
SCHEMAS: dict[str, str] = {
    "damped_matvec": "(Tensor hv, Tensor v, float scale, float shift) -> (Tensor, Tensor)",
    "cg_step_": "(Tensor(a!) x, Tensor(b!) r, Tensor p, Tensor ap, Tensor alpha) -> Tensor",
    "cg_direction_": "(Tensor(a!) p, Tensor r, Tensor beta) -> ()",
    "prox_grad": "(Tensor grad, Tensor theta, Tensor phi, float lam) -> Tensor",
    "axpby": "(float a, Tensor x, float b, Tensor y) -> Tensor",
}

OP_NAMES: tuple[str, ...] = tuple(SCHEMAS)

#: Ops with a CPU kernel (``csrc/cpu``) and the torch reference only (module docstring).
CPU_SCHEMAS: dict[str, str] = {
    "damped_into_": "(Tensor(a!) out, Tensor[] hv, Tensor v, float scale, float shift) -> Tensor",
    "layer_norm_double_backward": (
        "(Tensor u, Tensor? c_w, Tensor? c_b, Tensor gy, Tensor xhat, Tensor s, Tensor gx, Tensor m_gxh,"
        " Tensor? w) -> (Tensor, Tensor, Tensor)"
    ),
    "gelu_backward_and_curvature": "(Tensor gy, Tensor x, Tensor d1) -> (Tensor, Tensor)",
    "damped_into_blocks_": (
        "(Tensor(a!) out, Tensor[] hv, Tensor v, float scale, float shift, int[] offsets) -> Tensor"
    ),
    "cg_step_blocks_": ("(Tensor(a!) x, Tensor(b!) r, Tensor p, Tensor ap, Tensor alpha, int[] offsets) -> Tensor"),
    "cg_direction_blocks_": "(Tensor(a!) p, Tensor r, Tensor beta, int[] offsets) -> ()",
}

# FRAGMENT, not DEF: other modules may add ops to the ``bissl`` namespace too.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def _cg_direction_default(p: Tensor, r: Tensor, beta: Tensor) -> None:
    # The schema returns nothing (an op may not return an alias of its input); the public
    # function returns ``p`` itself.
    ref.cg_direction_ref_(p, r, beta)


_DEFAULT_IMPLS: dict[str, Callable[..., Any]] = {
    "damped_matvec": ref.damped_matvec_ref,
    "cg_step_": ref.cg_step_ref_,
    "cg_direction_": _cg_direction_default,
    "prox_grad": ref.prox_grad_ref,
    "axpby": ref.axpby_ref,
}


def _fake_damped_matvec(hv: Tensor, v: Tensor, scale: float, shift: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(hv), hv.new_empty(())


def _fake_cg_step_(x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: Tensor) -> Tensor:
    return x.new_empty(())


def _fake_cg_direction_(p: Tensor, r: Tensor, beta: Tensor) -> None:
    return None


def _fake_damped_into_(out: Tensor, hv: list[Tensor], v: Tensor, scale: float, shift: float) -> Tensor:
    return v.new_empty(())


def _fake_layer_norm_double_backward(
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
    return torch.empty_like(xhat), torch.empty_like(xhat), xhat.new_empty(xhat.shape[1] if w is not None else 0)


def _fake_gelu_backward_and_curvature(gy: Tensor, x: Tensor, d1: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def _fake_block_sums(*args: Any) -> Tensor:
    # (..., offsets) -> one value per block, like the first tensor argument.
    return args[0].new_empty(len(args[-1]) - 1)


def _fake_cg_direction_blocks_(p: Tensor, r: Tensor, beta: Tensor, offsets: list[int]) -> None:
    return None


def _fake_prox_grad(grad: Tensor, theta: Tensor, phi: Tensor, lam: float) -> Tensor:
    return torch.empty_like(grad)


def _fake_axpby(a: float, x: Tensor, b: float, y: Tensor) -> Tensor:
    return torch.empty_like(x)


_FAKE_IMPLS: dict[str, Callable[..., Any]] = {
    "damped_matvec": _fake_damped_matvec,
    "cg_step_": _fake_cg_step_,
    "cg_direction_": _fake_cg_direction_,
    "prox_grad": _fake_prox_grad,
    "axpby": _fake_axpby,
}


#: CPU_SCHEMAS op -> (torch reference, fake kernel).
_CPU_OP_IMPLS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "damped_into_": (ref.damped_into_ref_, _fake_damped_into_),
    "layer_norm_double_backward": (layer_norm_double_backward_ref, _fake_layer_norm_double_backward),
    "gelu_backward_and_curvature": (gelu_backward_and_curvature_ref, _fake_gelu_backward_and_curvature),
    "damped_into_blocks_": (ref.damped_into_blocks_ref_, _fake_block_sums),
    "cg_step_blocks_": (ref.cg_step_blocks_ref_, _fake_block_sums),
    "cg_direction_blocks_": (ref.cg_direction_blocks_ref_, _fake_cg_direction_blocks_),
}


def qualname(op: str) -> str:
    """``"cg_step_" -> "bissl::cg_step_"`` (raises ``ValueError`` for an unknown op)."""
    if op not in SCHEMAS:
        raise ValueError(f"unknown bissl op {op!r}; the ops are {OP_NAMES}")
    return f"{NAMESPACE}::{op}"


def dispatcher_op(op: str):
    """The ``torch.ops.bissl.<op>`` overload packet: the call that goes through the dispatcher."""
    qualname(op)
    return getattr(torch.ops.bissl, op)


def has_device_kernel(op: str, dispatch_key: str) -> bool:
    """Whether a non-default kernel is registered for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), dispatch_key)


def register_device_kernels(dispatch_key: str, kernels: dict) -> None:
    """Register Python kernels (e.g. Triton launchers) for every op on one dispatch key.

    Args:
        dispatch_key: "CUDA" (the only key Python kernels are registered for today).
        kernels: op name -> callable with the op's schema; must cover every op.

    Raises:
        ValueError: a missing op, or a kernel already registered for that key (one winner per
            device; :mod:`bissl.ops._backends` decides which).
    """
    missing = set(OP_NAMES) - set(kernels)
    if missing:
        raise ValueError(f"register_device_kernels: no kernel for {sorted(missing)}")
    for op in OP_NAMES:
        if has_device_kernel(op, dispatch_key):
            raise ValueError(f"register_device_kernels: {qualname(op)} already has a {dispatch_key} kernel")
    for op in OP_NAMES:
        _LIB.impl(op, kernels[op], dispatch_key)


def _define_all() -> None:
    for op, schema in SCHEMAS.items():
        _LIB.define(op + schema)
        _LIB.impl(op, _DEFAULT_IMPLS[op], "CompositeExplicitAutograd")
        torch.library.register_fake(qualname(op), _FAKE_IMPLS[op], lib=_LIB)
    for op, schema in CPU_SCHEMAS.items():
        _LIB.define(op + schema)
        _LIB.impl(op, _CPU_OP_IMPLS[op][0], "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{op}", _CPU_OP_IMPLS[op][1], lib=_LIB)


_define_all()
