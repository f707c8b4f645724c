"""The two copies of BiSSL as modules whose ``forward`` returns the training loss.

A DeepSpeed engine wraps one module and optimises whatever scalar its forward returns, so each
copy is a module holding a backbone and a head plus the loss that ties them to a batch:

* :class:`LowerObjective` — θ and the pretext head ψ_P; ``forward(batch, phi)`` is
  ``L_P(θ, ψ_P) + (λ/2)‖θ − φ‖²`` (φ a constant snapshot of the upper backbone);
* :class:`UpperObjective` — φ and the downstream head ψ_D; ``forward(batch)`` is ``L_D(φ, ψ_D)``
  and ``forward(batch, injected)`` the *surrogate* ``γ·L_D(φ, ψ_D) + Σ_i ⟨w_i, g_i⟩`` over its
  parameters ``w_i``, with the ``g_i`` constants. Its gradient is ``g + γ∇L_D``: with ``g`` the IFT
  term ``x`` on φ and ``∇_ψ L_D(θ, ψ_D)`` on ψ_D, this is exactly BiSSL's upper gradient, so the
  engine's own backward, data-parallel averaging, clipping and optimizer apply it unchanged.

Under ZeRO-3 the parameters are partitioned outside the submodule that owns them; the two terms
that touch them directly (the proximal term, the injection) gather them for that moment with
``deepspeed.zero.GatheredParameters``. Their backward needs only ``θ − φ`` resp. ``g``, never the
parameter values, so nothing has to stay gathered for the backward pass. Without ZeRO-3 (or
without DeepSpeed) the gather is a no-op.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from bissl.typing import Params

#: ``loss_fn(backbone, head, batch) -> scalar Tensor``; the modules are called like any module.
ObjectiveLoss = Callable[[nn.Module, nn.Module, Any], Tensor]


def _is_zero3_param(p: Tensor) -> bool:
    return hasattr(p, "ds_id")


def gathered(params: Iterable[nn.Parameter]) -> AbstractContextManager[None]:
    """Context in which ZeRO-3-partitioned ``params`` hold their full values (read-only).

    A no-op when none of them is partitioned (ZeRO 0-2, plain torch), so callers need no branch.
    """
    params = list(params)
    if not any(_is_zero3_param(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only reachable when DeepSpeed partitioned these parameters

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class BilevelObjective(nn.Module):
    """``backbone`` + ``head`` + ``loss_fn(backbone, head, batch)``; shared base of both copies.

    Parameter names are ``backbone.<name>`` and ``head.<name>``; the backbone parameters of the
    lower and the upper copy must have the same names and shapes (θ and φ are paired by name).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, loss_fn: ObjectiveLoss) -> None:
        super().__init__()
        if not callable(loss_fn):
            raise TypeError(f"{type(self).__name__}: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.backbone = backbone
        self.head = head
        self.loss_fn = loss_fn
        #: Detached terms of the last forward, for logging: {"loss": ..., "prox": ...}.
        self.last_terms: dict[str, Tensor] = {}

    def objective(self, batch: Any) -> Tensor:
        loss = self.loss_fn(self.backbone, self.head, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"{type(self).__name__}: loss_fn must return a scalar tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")
        return loss

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


class LowerObjective(BilevelObjective):
    """θ + ψ_P. ``forward(batch, phi=None)``: ``L_P`` plus, given ``phi``, ``(lam/2)‖θ − φ‖²``.

    Args:
        backbone, head, loss_fn: see :class:`BilevelObjective` (``loss_fn`` is the pretext loss).
        lam: proximal weight λ > 0 (reference: 0.001). The proximal term touches backbone
            parameters only (BatchNorm affine weights included, buffers not), as in BiSSL.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, loss_fn: ObjectiveLoss, *, lam: float) -> None:
        super().__init__(backbone, head, loss_fn)
        if not lam > 0:
            raise ValueError(f"LowerObjective: lam must be > 0, got {lam}")
        self.lam = float(lam)

    def forward(self, batch: Any, phi: Params | None = None) -> Tensor:
        """Scalar loss. ``phi``: ``{name: Tensor}`` of the upper backbone, full, detached."""
        loss = self.objective(batch)
        self.last_terms = {"loss": loss.detach()}
        if phi is None:
            return loss
        prox = proximal_term(self.backbone, phi, self.lam)
        self.last_terms["prox"] = prox.detach()
        return loss + prox


def proximal_term(backbone: nn.Module, phi: Params, lam: float) -> Tensor:
    """``(lam/2) Σ_i ‖θ_i − φ_i‖²`` over the backbone's parameters, paired with ``phi`` by name."""
    named = dict(backbone.named_parameters())
    if set(named) != set(phi):
        missing, extra = sorted(set(named) - set(phi)), sorted(set(phi) - set(named))
        raise ValueError(f"proximal_term: phi must have the backbone's parameter names "
                         f"(missing {missing[:3]}, extra {extra[:3]})")
    with gathered(named.values()):
        total = sum(((p - phi[k].detach()) ** 2).sum() for k, p in named.items())
    return 0.5 * lam * total


class UpperObjective(BilevelObjective):
    """φ + ψ_D. ``forward(batch)`` = ``L_D``; ``forward(batch, injected)`` = the upper surrogate.

    Args:
        backbone, head, loss_fn: see :class:`BilevelObjective` (``loss_fn`` is the downstream loss).
        gamma: weight γ of the direct term ``L_D(φ, ψ_D)`` in the upper objective (reference: 1).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, loss_fn: ObjectiveLoss, *, gamma: float = 1.0) -> None:
        super().__init__(backbone, head, loss_fn)
        if not gamma >= 0:
            raise ValueError(f"UpperObjective: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def forward(self, batch: Any, injected: Sequence[Tensor] | None = None) -> Tensor:
        """``L_D(φ, ψ_D)``, or with ``injected`` (one constant per parameter, in
        ``self.parameters()`` order, full shapes) ``γ·L_D(φ, ψ_D) + Σ_i ⟨w_i, injected_i⟩``."""
        loss = self.objective(batch)
        self.last_terms = {"loss": loss.detach()}
        if injected is None:
            return loss
        params = list(self.parameters())
        if len(injected) != len(params):
            raise ValueError(f"UpperObjective: injected has {len(injected)} tensors, the module "
                             f"has {len(params)} parameters")
        return self.gamma * loss + injection_term(params, injected)


def injection_term(params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> Tensor:
    """``Σ_i ⟨w_i, g_i⟩`` with ``g_i`` constants: its gradient with respect to ``w_i`` is ``g_i``."""
    with gathered(params):
        terms = []
        for w, g in zip(params, grads):
            if g.shape != w.shape:
                raise ValueError(f"injection_term: gradient of shape {tuple(g.shape)} for a "
                                 f"parameter of shape {tuple(w.shape)}")
            terms.append(torch.sum(w * g.detach().to(w.dtype)))
    return torch.stack(terms).sum()
