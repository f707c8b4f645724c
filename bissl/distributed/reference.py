"""Single-process oracle of the data-parallel BiSSL step (plain torch, no collectives, no DeepSpeed).

A data-parallel step with ``N`` ranks optimises the average of the ``N`` per-shard losses (each
shard normalised with its own BatchNorm statistics, contrastive negatives from its own shard).
:func:`reference_bissl_step` computes exactly that in one process, looping over the shards, with the
gradients assembled explicitly as the single-process trainer does (proximal gradient, IFT term by
the core's :func:`~bissl.hypergrad.implicit_hypergrad`, ``x + γ∇``, total-norm clipping, optimizer
step). It shares only the loss definitions (``objective``) with the distributed code; the proximal
term, the surrogate injection, the reductions and the engines are all bypassed.

Running statistics are *not* reproduced (here they move once per shard per step); compare
parameters, not buffers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from bissl.distributed.objectives import LowerObjective, UpperObjective
from bissl.distributed.step import HypergradSettings
from bissl.hypergrad import implicit_hypergrad
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.typing import Params


def _mean(values: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(values)).mean()


def _set_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach().clone()


def reference_bissl_step(
    lower: LowerObjective,
    upper: UpperObjective,
    lower_optimizer: torch.optim.Optimizer,
    upper_optimizer: torch.optim.Optimizer,
    lower_shards: Sequence[Sequence[Any]],
    hvp_shards: Sequence[Any],
    upper_shards: Sequence[Any],
    hyper: HypergradSettings | None = None,
    *,
    lower_clip_norm: float | None = 10.0,
    upper_clip_norm: float | None = 10.0,
    lower_scheduler: Any = None,
    upper_scheduler: Any = None,
) -> dict[str, Tensor]:
    """One BiSSL step on shard-averaged losses, in one process.

    Args:
        lower, upper: the objectives (modified in place, like the engines' modules).
        lower_optimizer, upper_optimizer: torch optimizers over their parameters.
        lower_shards: per lower step, the list of the ``N`` ranks' batch shards.
        hvp_shards, upper_shards: the ``N`` shards of the HVP batch and of the downstream batch.
        hyper: solver settings (default: :class:`HypergradSettings()`); ``lower.lam`` and
            ``upper.gamma`` as in the distributed step.
        lower_clip_norm, upper_clip_norm: total-norm clipping (None or 0: none).
        lower_scheduler, upper_scheduler: LR schedulers stepped after every optimizer step, as the
            engines do (default: none).

    Returns:
        ``{"x": flat IFT term, "loss_phi": shard-averaged direct loss}`` (detached).
    """
    hyper = hyper or HypergradSettings()
    lam, gamma = lower.lam, upper.gamma
    theta_named = dict(lower.backbone.named_parameters())
    phi = {k: p.detach().clone() for k, p in upper.backbone.named_parameters()}
    lower_params = [p for p in lower.parameters() if p.requires_grad]
    for shards in lower_shards:
        loss = _mean([lower.objective(b) for b in shards])
        prox = 0.5 * lam * sum(((p - phi[k]) ** 2).sum() for k, p in theta_named.items())
        lower_optimizer.zero_grad(set_to_none=True)
        (loss + prox).backward()
        if lower_clip_norm:
            torch.nn.utils.clip_grad_norm_(lower_params, lower_clip_norm)
        lower_optimizer.step()
        if lower_scheduler is not None:
            lower_scheduler.step()

    theta = {k: p.detach() for k, p in lower.backbone.named_parameters()}

    def with_theta(module, th: Params, batch: Any) -> Tensor:
        return functional_call(module, {f"backbone.{k}": v for k, v in th.items()}, (batch,))

    def lower_loss(th: Params) -> Tensor:
        return _mean([with_theta(lower, th, b) for b in hvp_shards])

    def upper_loss(th: Params) -> Tensor:
        return _mean([with_theta(upper, th, b) for b in upper_shards])

    x = implicit_hypergrad(lower_loss, upper_loss, theta, lam=lam, iters=hyper.iters, damping=hyper.damping,
                           solver=hyper.solver, hvp_mode=hyper.hvp_mode, backend=hyper.backend,
                           strict=hyper.strict, on_indefinite=hyper.on_indefinite, fallback=hyper.fallback,
                           rtol=hyper.rtol)
    head = list(upper.head.parameters())
    with batchnorm_stats_frozen():
        g_psi_theta = torch.autograd.grad(upper_loss(theta), head)
    phi_params = list(upper.backbone.parameters())
    direct = _mean([upper.objective(b) for b in upper_shards])
    g_direct = torch.autograd.grad(direct, phi_params + head)
    names = list(dict(upper.backbone.named_parameters()))
    g_phi = [x[k] + gamma * g for k, g in zip(names, g_direct[: len(phi_params)])]
    g_head = [gt + gamma * gd for gt, gd in zip(g_psi_theta, g_direct[len(phi_params):])]
    upper_optimizer.zero_grad(set_to_none=True)
    _set_grads(phi_params + head, g_phi + g_head)
    if upper_clip_norm:
        torch.nn.utils.clip_grad_norm_(phi_params + head, upper_clip_norm)
    upper_optimizer.step()
    if upper_scheduler is not None:
        upper_scheduler.step()
    return {"x": torch.cat([x[k].reshape(-1) for k in names]).detach(), "loss_phi": direct.detach()}
