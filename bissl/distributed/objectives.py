"""The models of the pipeline as modules whose ``forward`` returns the training loss.

A DeepSpeed engine (like any :class:`~bissl.distributed.trainable.Trainable`) wraps one module and
optimises whatever scalar its forward returns, so each model is a module holding a backbone and a
head plus the loss that ties them to a batch:

* :class:`LowerObjective` — θ and the pretext head ψ_P; ``forward(batch)`` is ``L_P(θ, ψ_P)``
  (pretext pretraining, and BiSSL's lower level, whose proximal gradient ``λ(θ − φ)`` the step adds
  to the averaged gradient directly, see :mod:`bissl.trainer.bissl_step`);
* :class:`UpperObjective` — φ and the downstream head ψ_D; ``forward(batch)`` is ``L_D(φ, ψ_D)``
  (fine-tuning) and ``forward(batch, injected)`` the *surrogate* ``γ·L_D(φ, ψ_D) + Σ_i ⟨w_i, g_i⟩``
  over its parameters ``w_i``, with the ``g_i`` constants (``batch=None``: the injection alone).
  Its gradient is ``g + γ∇L_D``: with ``g`` the IFT term on φ and ``∇_ψ L_D(θ, ψ_D)`` on ψ_D, this
  is exactly BiSSL's upper gradient, so the engine's own backward, data-parallel averaging,
  clipping and optimizer apply it unchanged.

Under ZeRO-3 the parameters are partitioned outside the submodule that owns them; the injection
gathers them for that moment. Its backward needs only ``g``, never the parameter values, so
nothing has to stay gathered for the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bissl.distributed.zero3 import gathered, modifiable

#: ``loss_fn(backbone, head, batch) -> scalar Tensor``; the modules are called like any module.
ObjectiveLoss = Callable[[nn.Module, nn.Module, Any], Tensor]


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
        #: Detached terms of the last forward, for logging: {"loss": ...}.
        self.last_terms: dict[str, Tensor] = {}

    def objective(self, batch: Any) -> Tensor:
        loss = self.loss_fn(self.backbone, self.head, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(
                f"{type(self).__name__}: loss_fn must return a scalar tensor, got "
                f"{getattr(loss, 'shape', type(loss).__name__)}"
            )
        return loss


class LowerObjective(BilevelObjective):
    """θ + ψ_P; ``forward(batch)`` is the pretext loss ``L_P``."""

    def forward(self, batch: Any) -> Tensor:
        loss = self.objective(batch)
        self.last_terms = {"loss": loss.detach()}
        return loss

    @torch.no_grad()
    def update_target(self) -> None:
        """Move a pretext head's EMA target toward the online network (BYOL; after optimizer
        steps only, never inside an HVP). A no-op for heads without a target (SimCLR, GPT).
        Under ZeRO-3 the online weights are gathered and the target re-partitioned."""
        head: Any = self.head  # duck-typed: a head with a target defines the methods used here
        targets = list(getattr(head, "target_parameters", lambda: [])())
        if not targets:
            return
        online = list(self.backbone.parameters()) + list(head.online_parameters())
        with gathered(online), modifiable(targets):
            head.update_target(self.backbone)


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
        """``L_D(φ, ψ_D)``; with ``injected`` (one constant per parameter, in ``self.parameters()``
        order, full shapes) ``γ·L_D(φ, ψ_D) + Σ_i ⟨w_i, injected_i⟩``, or with ``batch=None`` the
        injection alone."""
        if injected is None:
            if batch is None:
                raise ValueError("UpperObjective: give a batch, injected gradients, or both")
            loss = self.objective(batch)
            self.last_terms = {"loss": loss.detach()}
            return loss
        params = list(self.parameters())
        if len(injected) != len(params):
            raise ValueError(
                f"UpperObjective: injected has {len(injected)} tensors, the module has {len(params)} parameters"
            )
        direct = None
        if batch is not None:
            # The direct term's forward first: ZeRO-3's hooks fetch and release the parameters
            # module by module; the injection then gathers them all for a moment.
            direct = self.objective(batch)
            self.last_terms = {"loss": direct.detach()}
        total = injection_term(params, injected)
        return total if direct is None else self.gamma * direct + total


def injection_term(params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> Tensor:
    """``Σ_i ⟨w_i, g_i⟩`` with ``g_i`` constants: its gradient with respect to ``w_i`` is ``g_i``."""
    with gathered(params):
        terms = []
        for w, g in zip(params, grads):
            if g.shape != w.shape:
                raise ValueError(
                    f"injection_term: gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(w.shape)}"
                )
            terms.append(torch.sum(w * g.detach().to(w.dtype)))
    return torch.stack(terms).sum()
