"""One BiSSL step under DeepSpeed: ``N`` lower steps, then one upper step with the hypergradient.

Per rank, with its own batch shards:

1. φ snapshot: the upper backbone, full (gathered and copied under ZeRO-3; live views otherwise —
   φ does not move during the lower steps).
2. Lower steps: ``loss = L_P(θ, ψ_P) + (λ/2)‖θ − φ‖²`` through the lower engine (backward, gradient
   averaging, clipping, optimizer step: DeepSpeed's).
3. Upper step: with θ, ψ_P and ψ_D gathered (read-only, ZeRO-3), on the meta shadows:
   ``x = (I + H/(λ + damping))⁻¹ ∇_θ L_D(θ, ψ_D)`` by :func:`distributed_implicit_hypergrad` (H on
   the HVP shard, one flat all-reduce per HVP) and ``g_ψ = ∇_ψ L_D(θ, ψ_D)`` (this rank's shard).
   Then the upper engine runs the surrogate ``γ L_D(φ, ψ_D) + ⟨φ, x⟩ + ⟨ψ_D, g_ψ⟩``, whose
   rank-averaged gradient is BiSSL's ``(x + γ∇_φ L_D, ∇_ψ L_D(θ) + γ∇_ψ L_D(φ))``, clipped and applied
   by the engine.
4. Floating-point buffers (BatchNorm running statistics) of both copies are averaged across ranks
   (one flat all-reduce per copy), so every rank, and every checkpoint, holds the same model.

BatchNorm policy as the single-process trainer: training forwards (lower steps, the direct upper
term through φ) update running statistics; derivative-only passes (HVPs, the downstream pass through
θ) use batch statistics and leave buffers alone. Each rank normalises with its own shard's
statistics (no SyncBN), so the data-parallel objective is the average of the per-shard losses —
what :func:`bissl.distributed.reference.reference_bissl_step` computes in one process.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bissl.distributed.collectives import allreduce_mean_tensors_
from bissl.distributed.engines import BilevelEngines
from bissl.distributed.hypergrad import distributed_implicit_hypergrad
from bissl.distributed.matvec import MatVecHook
from bissl.distributed.objectives import gathered
from bissl.hypergrad.implicit import IndefinitePolicy, SolverName
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.hvp import HVPMode
from bissl.typing import Params


@dataclass(frozen=True)
class HypergradSettings:
    """Solver settings of the upper step (BiSSL reference defaults)."""

    damping: float = 10.0
    iters: int = 5
    solver: SolverName = "cg"
    hvp_mode: HVPMode = "revrev"
    strict: bool = True
    on_indefinite: IndefinitePolicy = "raise"
    fallback: SolverName = "minres"
    rtol: float | None = None
    backend: str | None = None


def _sync_modes(shadow: nn.Module, live: nn.Module) -> None:
    """Give the shadow the train/eval flags of the live module (they may change during a run)."""
    for s, m in zip(shadow.modules(), live.modules()):
        s.training = m.training


def _buffers(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}{k}": b for k, b in module.named_buffers()}


def phi_snapshot(engines: BilevelEngines) -> Params:
    """The upper backbone φ as full, detached tensors keyed like the backbone.

    Views of the live parameters below ZeRO-3 (no copy); a gathered copy under ZeRO-3.
    """
    backbone = engines.upper_module.backbone
    named = dict(backbone.named_parameters())
    with gathered(named.values()):
        if engines.zero_stage == 3:
            return {k: p.detach().clone() for k, p in named.items()}
        return {k: p.detach() for k, p in named.items()}


def lower_step(engines: BilevelEngines, batch: Any, phi: Params) -> dict[str, Tensor]:
    """One engine step on ``L_P + (λ/2)‖θ − φ‖²``; returns the detached loss terms."""
    engine = engines.lower
    loss = engine(batch, phi)
    engine.backward(loss)
    engine.step()
    return dict(engines.lower_module.last_terms)


def hypergradient(engines: BilevelEngines, hvp_batch: Any, upper_batch: Any, hyper: HypergradSettings,
                  *, on_matvec: MatVecHook | None = None) -> tuple[list[Tensor], dict[str, Any]]:
    """This rank's gradient injection for the upper surrogate, and diagnostics.

    Returns:
        ``(injected, info)``: one tensor per parameter of the upper objective, in its
        ``parameters()`` order — ``x`` (rank-averaged, identical on all ranks) for φ and this
        shard's ``∇_ψ L_D(θ, ψ_D)`` for ψ_D — and ``{"loss_theta", "solve"}``.
    """
    lower, upper = engines.lower_module, engines.upper_module
    _sync_modes(engines.lower_shadow, lower)
    _sync_modes(engines.upper_shadow, upper)
    upper_head = dict(upper.head.named_parameters())
    lower_all = list(lower.parameters())
    with gathered(lower_all + list(upper_head.values())):
        theta = {k: p.detach() for k, p in lower.backbone.named_parameters()}
        psi_p = {f"head.{k}": p.detach() for k, p in lower.head.named_parameters()}
        psi_d = {k: p.detach().requires_grad_(True) for k, p in upper_head.items()}
        fixed_lower = {**psi_p, **_buffers(lower.backbone, "backbone."), **_buffers(lower.head, "head.")}
        # L_D(θ, ψ_D) normalises with θ's batch statistics; θ's own buffers complete the state.
        fixed_upper = {**_buffers(lower.backbone, "backbone."), **_buffers(upper.head, "head.")}
        seen: dict[str, Any] = {}

        def lower_loss(th: Params) -> Tensor:
            state = {**{f"backbone.{k}": v for k, v in th.items()}, **fixed_lower}
            return functional_call(engines.lower_shadow, state, (hvp_batch,), strict=True)

        def upper_loss(th: Params) -> Tensor:
            state = {**{f"backbone.{k}": v for k, v in th.items()},
                     **{f"head.{k}": v for k, v in psi_d.items()}, **fixed_upper}
            with batchnorm_stats_frozen():
                loss = functional_call(engines.upper_shadow, state, (upper_batch,), strict=True)
            # The same forward gives v = ∇_θ L_D (taken by the core) and ∇_ψ L_D (taken here).
            seen["loss_theta"] = loss.detach()
            seen["g_psi"] = torch.autograd.grad(loss, tuple(psi_d.values()), retain_graph=True,
                                                allow_unused=True)
            return loss

        x, solve = distributed_implicit_hypergrad(
            lower_loss, upper_loss, theta, lam=lower.lam, iters=hyper.iters, damping=hyper.damping,
            solver=hyper.solver, hvp_mode=hyper.hvp_mode, backend=hyper.backend, strict=hyper.strict,
            on_indefinite=hyper.on_indefinite, fallback=hyper.fallback, rtol=hyper.rtol,
            return_info=True, bucket_numel=engines.settings.hypergrad_bucket_numel, on_matvec=on_matvec)
        g_psi = {k: torch.zeros_like(p) if g is None else g.detach()
                 for (k, p), g in zip(psi_d.items(), seen["g_psi"])}
    if not hyper.strict and bool(solve.nonfinite):
        # Report-only mode: as the single-process trainer, drop the non-finite entries of the IFT
        # term instead of poisoning φ (the flag is identical on every rank, so all ranks agree).
        warnings.warn("bissl_step: the hypergradient solve produced NaN/Inf; those entries are set "
                      "to 0 (HypergradSettings(strict=True) raises instead)", RuntimeWarning, stacklevel=3)
        x = {k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in x.items()}
    by_name = {**{f"backbone.{k}": v for k, v in x.items()}, **{f"head.{k}": v for k, v in g_psi.items()}}
    injected = [by_name[k] for k, _ in upper.named_parameters()]
    return injected, {"loss_theta": seen["loss_theta"], "solve": solve}


def upper_step(engines: BilevelEngines, upper_batch: Any, injected: Sequence[Tensor]) -> Tensor:
    """One engine step on the upper surrogate; returns the detached direct loss ``L_D(φ, ψ_D)``."""
    engine = engines.upper
    loss = engine(upper_batch, injected)
    engine.backward(loss)
    engine.step()
    return engines.upper_module.last_terms["loss"]


def average_buffers_(module: nn.Module, *, bucket_numel: int | None = None) -> int:
    """Average the floating-point buffers of ``module`` across ranks (one flat all-reduce).

    Running means average exactly to the mean over all shards; running variances to the mean of
    the per-shard variances (the between-shard spread is not included, as without SyncBN).
    Integer buffers (``num_batches_tracked``) are equal on all ranks already. Returns collectives.
    """
    floats = [b for b in module.buffers() if b.is_floating_point()]
    return allreduce_mean_tensors_(floats, bucket_numel=bucket_numel)


def bissl_step(engines: BilevelEngines, lower_batches: Sequence[Any], hvp_batch: Any, upper_batch: Any,
               hyper: HypergradSettings | None = None, *,
               on_matvec: MatVecHook | None = None) -> dict[str, Any]:
    """``len(lower_batches)`` lower steps, then one upper step (see module docstring).

    Args:
        engines: from :func:`~bissl.distributed.engines.build_bilevel_engines`.
        lower_batches: this rank's pretext batch shard for each lower step.
        hvp_batch: this rank's shard of the pretext batch that defines H.
        upper_batch: this rank's downstream batch shard.
        hyper: solver settings (default: :class:`HypergradSettings()`, the reference's).
        on_matvec: hook after each averaged HVP (tracing, tests).

    Returns:
        ``{"lower": [terms per lower step], "loss_phi", "loss_theta", "solve"}`` (detached tensors,
        this rank's shard values; ``solve`` is the :class:`~bissl.solvers.SolveResult`).
    """
    hyper = hyper or HypergradSettings()
    lower_terms = []
    if lower_batches:
        phi = phi_snapshot(engines)  # φ is constant during the lower steps
        lower_terms = [lower_step(engines, batch, phi) for batch in lower_batches]
        del phi
    injected, info = hypergradient(engines, hvp_batch, upper_batch, hyper, on_matvec=on_matvec)
    loss_phi = upper_step(engines, upper_batch, injected)
    bucket = engines.settings.hypergrad_bucket_numel
    average_buffers_(engines.lower_module, bucket_numel=bucket)
    average_buffers_(engines.upper_module, bucket_numel=bucket)
    return {"lower": lower_terms, "loss_phi": loss_phi, **info}
