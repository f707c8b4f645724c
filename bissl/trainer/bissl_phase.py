"""Pipeline step 2: the BiSSL bilevel stage.

Start: the lower model (backbone θ + pretext head ψ_P) is the pretext result (BYOL: its target is
re-initialised from the online network); the upper model is a copy φ of the same backbone with a
new downstream head ψ_D. Then

1. **head warm-up**: ``bissl.head_warmup_epochs`` epochs of SGD on ψ_D with φ frozen (eval mode,
   so φ's BatchNorm statistics do not move either), at the upper lr/wd;
2. ``bissl.stages`` **training stages**, each ``lower_steps`` lower steps then ``upper_steps``
   upper steps:

   * lower step: LARS on (θ, ψ_P) with gradient ``∇L_P + λ(θ − φ)`` on θ (the proximal term
     touches backbone parameters only, φ constant; :func:`bissl.ops.prox_grad` on flat buffers),
     total-norm clipping, then BYOL's EMA (lower steps only);
   * upper step: ``x = (I + H/(λ + λ_damp))⁻¹ ∇_θ L_D(θ, ψ_D)`` by :func:`bissl.hypergrad.implicit_hypergrad`,
     H the pretext-loss Hessian on ONE pretext batch (and its two views) drawn at the start of
     the stage's upper steps and reused for all of them;
     ``g_φ = x + γ ∇_φ L_D(φ, ψ_D)``, ``g_ψ = ∇_ψ L_D(θ, ψ_D) + γ ∇_ψ L_D(φ, ψ_D)`` (the gradient of
     the upper objective ``L_D(θ*(φ), ψ_D) + γ L_D(φ, ψ_D)``; the reference code uses γ = 1, where
     the two coincide), clipped together to total norm ``clip_norm``, one SGD-momentum step.

Variants (the thesis' questions, all off by default): ``bissl.lam_schedule`` adapts λ during
training (:mod:`bissl.hypergrad.lam_schedules`; the lower steps and the IFT use the same current
λ); ``bissl.direct_term: theta`` evaluates the direct term at θ (``g_φ = x + γ∇_θ L_D(θ)``,
``g_ψ = (1 + γ)∇_ψ L_D(θ)``, no pass through φ); ``bissl.prox_pull: ρ`` adds ``ρλ(φ − θ)`` to
``g_φ``; ``bissl.solver`` picks the inverse-HVP approximation (CG, layer-wise CG, MINRES,
Neumann, identity).

BatchNorm policy. Ordinary training forward passes in train mode update running statistics as
usual: lower steps update θ's (and ψ_P's), upper steps' pass through φ updates φ's. Passes that only
serve a derivative do not: the HVPs (the core's policy) and the downstream pass through θ inside
the hypergradient, which normalises with batch statistics and leaves θ's buffers alone (the
reference lets both move θ's statistics; θ's statistics should describe the pretext data that θ is
trained on, and a 5-iteration CG should not count as 5 extra updates).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from bissl.config import Config
from bissl.hypergrad import implicit_hypergrad
from bissl.hypergrad.lam_schedules import ConstantLam, LowerStepStats, build_lam_schedule
from bissl.ops import axpby, batchnorm_stats_frozen, flat_spec, flatten, prox_grad, unflatten
from bissl.ops.hvp_mode import select_hvp_mode
from bissl.solvers import SolverError
from bissl.tasks.downstream import classification_loss
from bissl.trainer.bissl_stage import (
    StageBatches, StageSchedule, downstream_objective, lower_optimizer, lower_schedule,
    pretext_objective, solver_columns, start_models, upper_optimizer, upper_schedule,
    warmup_loss, warmup_optimizer,
)
from bissl.trainer.builders import PipelineData, clip_, current_lr
from bissl.trainer.loop import Phase, RunContext

class BisslPhase(Phase):
    """The BiSSL stage as ``W + stages·(lower_steps + upper_steps)`` steps (W: head warm-up steps).

    Args:
        cfg, data, ctx: experiment config, tensors, run context.
        pretext_result: ``{"backbone", "pretext"}`` state dicts from :class:`PretextPhase`.
    """

    name = "bissl"

    def __init__(self, cfg: Config, data: PipelineData, ctx: RunContext,
                 pretext_result: dict[str, Any]) -> None:
        b = cfg.bissl
        self.cfg, self.data, self.device, self.seed = cfg, data, ctx.device, ctx.seed
        self.models = start_models(cfg, data, ctx.device, pretext_result)
        self.theta_net, self.pretext = self.models.theta_net, self.models.pretext
        self.phi_net, self.head = self.models.phi_net, self.models.head

        self.theta_params = list(self.theta_net.parameters())
        self.theta_names = [n for n, _ in self.theta_net.named_parameters()]
        self.phi_params = list(self.phi_net.parameters())
        self.head_params = list(self.head.parameters())
        self.lower_params = self.theta_params + list(self.pretext.online_parameters())
        self.spec = flat_spec(dict(self.theta_net.named_parameters()))

        self.batches = StageBatches(cfg, data, ctx.seed, ctx.device)
        self.schedule = StageSchedule.from_config(cfg, self.batches.upper_sampler.steps_per_epoch)
        self.warmup_steps = self.schedule.warmup_steps
        super().__init__(self.schedule.total_steps)

        self.warmup_opt, self.warmup_sched = warmup_optimizer(cfg, self.head_params, self.warmup_steps)
        self.lower_opt = lower_optimizer(cfg, self.lower_params)
        self.lower_sched = lower_schedule(cfg, self.lower_opt)
        self.upper_opt = upper_optimizer(cfg, self.phi_params + self.head_params)
        self.upper_sched = upper_schedule(cfg, self.upper_opt)
        self._warned_nonfinite = False
        # One λ for the lower problem and the upper step's IFT (bissl.hypergrad.lam_schedules).
        self.lam_schedule = build_lam_schedule(b.lam_schedule, b.lam, b.lam_options)
        self._lower_count = 0

    # ------------------------------------------------------------------ schedule
    def locate(self, step: int) -> tuple[str, int, int]:
        """``(part, stage, k)`` of 0-based step ``step`` (see :meth:`StageSchedule.locate`)."""
        return self.schedule.locate(step)

    def describe_step(self, step: int) -> str:
        return self.schedule.describe(step)

    def step(self) -> list[dict[str, Any]]:
        part, stage, _ = self.locate(self.step_idx)
        if part == "warmup":
            row = self._warmup_step()
        elif part == "lower":
            row = self._lower_step()
        else:
            row = self._upper_step(stage)
        self.step_idx += 1
        row.setdefault("round", stage + 1 if stage >= 0 else self.batches.upper_sampler.epoch + 1)
        return [row]

    # ------------------------------------------------------------------ the three kinds of step
    def _warmup_step(self) -> dict[str, Any]:
        x, y = self.batches.downstream()
        lr = current_lr(self.warmup_opt)
        loss = warmup_loss(self.phi_net, self.head, x, y)
        self.warmup_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.warmup_opt.step()
        self.warmup_sched.step()
        return {"part": "warmup", "loss": loss.detach(), "lr": lr}

    def _lower_step(self) -> dict[str, Any]:
        lam = self.lam_schedule.value
        self.theta_net.train()
        self.pretext.train()
        views = self.batches.lower_views()
        lr = current_lr(self.lower_opt)
        loss = pretext_objective(self.theta_net, self.pretext, views)
        self.lower_opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
                     for n, p in zip(self.theta_names, self.theta_params)}
            theta = flatten({n: p for n, p in zip(self.theta_names, self.theta_params)}, self.spec)
            phi = flatten({n: p for n, p in zip(self.theta_names, self.phi_params)}, self.spec)
            g_pretext = flatten(grads, self.spec)
            g = prox_grad(g_pretext, theta, phi, lam)
            for p, gp in zip(self.theta_params, unflatten(g, self.spec).values()):
                p.grad = gp.clone()
            sq_dist = torch.dot(theta - phi, theta - phi)
            prox = 0.5 * lam * sq_dist
            if not isinstance(self.lam_schedule, ConstantLam):  # adaptive rules read host floats
                self.lam_schedule.observe(LowerStepStats(
                    step=self._lower_count, pretext_grad_norm=float(g_pretext.norm()),
                    distance=math.sqrt(float(sq_dist)), phi_norm=float(phi.norm())))
        self._lower_count += 1
        grad_norm = clip_(self.lower_params, self.cfg.bissl.clip_norm)
        self.lower_opt.step()
        self.lower_sched.step()
        self.pretext.update_target(self.theta_net)  # BYOL EMA on lower steps only
        return {"part": "lower", "loss": loss.detach(), "prox": prox, "lr": lr, "grad_norm": grad_norm,
                "lam": lam}

    def _upper_step(self, stage: int) -> dict[str, Any]:
        b = self.cfg.bissl
        hvp_views = self.batches.hvp_views(stage)
        x, y = self.batches.downstream()
        self.theta_net.train()
        self.pretext.train()
        self.phi_net.train()
        self.head.train()
        net, pretext, head = self.theta_net, self.pretext, self.head
        seen: dict[str, Any] = {}

        def lower_loss(theta: dict[str, Tensor]) -> Tensor:
            # The encoder forwards keyword arguments (e.g. a GPT's return_sequence=True).
            def encode(*args: Any, **kwargs: Any) -> Tensor:
                return torch.func.functional_call(net, theta, args, kwargs)
            return pretext.loss(encode, *hvp_views)

        def upper_loss(theta: dict[str, Tensor]) -> Tensor:
            # One forward through θ gives both v = ∇_θ L_D(θ, ψ_D) (taken by the core) and
            # ∇_ψ L_D(θ, ψ_D) (taken here, keeping the graph for the core's backward).
            with batchnorm_stats_frozen():
                loss = classification_loss(head(torch.func.functional_call(net, theta, (x,))), y)
            seen["loss"] = loss.detach()
            seen["g_psi"] = torch.autograd.grad(loss, self.head_params, retain_graph=True)
            return loss

        theta = {n: p.detach() for n, p in zip(self.theta_names, self.theta_params)}
        lam = self.lam_schedule.value
        kwargs: dict[str, Any] = {}
        if b.hvp_mode == "auto":
            # Probed once on the first upper step, cached per loss code and modules afterwards.
            kwargs["hvp_mode"] = select_hvp_mode(lower_loss, theta)
        elif b.hvp_mode is not None:
            kwargs["hvp_mode"] = b.hvp_mode
        if b.direct_term == "theta":
            # The solve's right-hand side is ∇_θ L_D(θ): keep a copy for the direct term instead
            # of a second backward (the hook sees it before the solve).
            kwargs["reduce_rhs"] = lambda v: seen.__setitem__("v", v.clone())
        try:
            xs, info = implicit_hypergrad(
                lower_loss, upper_loss, theta, lam=lam, iters=b.cg_iters, damping=b.damping,
                solver=b.solver, backend=b.backend, strict=b.strict, on_indefinite=b.on_indefinite,
                fallback=b.fallback_solver, return_info=True, **kwargs)
        except SolverError as err:
            raise SolverError(f"{err} (phase '{self.name}', {self.describe_step(self.step_idx + 1)}; "
                              "bissl.strict is true)") from err
        if "g_psi" not in seen:
            raise RuntimeError("implicit_hypergrad did not evaluate upper_loss; cannot form ∇_ψ L_D(θ)")
        diag = info.summary()
        x_flat = flatten(xs, self.spec)
        if diag["nonfinite"]:
            # strict=False: report (metrics column cg_nonfinite) and drop the non-finite entries of
            # the implicit term, as the reference does, instead of poisoning φ.
            if not self._warned_nonfinite:
                warnings.warn(f"BiSSL: the {b.solver} solve produced NaN/Inf at "
                              f"{self.describe_step(self.step_idx + 1)}; those entries are set to 0 "
                              "(set bissl.strict: true to stop instead)", RuntimeWarning, stacklevel=2)
                self._warned_nonfinite = True
            x_flat = torch.nan_to_num(x_flat, nan=0.0, posinf=0.0, neginf=0.0)

        lr = current_lr(self.upper_opt)
        g_direct, g_psi_direct, loss_direct = self._direct_term(x, y, seen)
        with torch.no_grad():
            g_phi = axpby(1.0, x_flat, b.gamma, g_direct)
            if b.prox_pull > 0:
                # ρ·λ(φ − θ): the proximal term's own φ-gradient, pulling φ toward θ.
                theta_flat = flatten(theta, self.spec)
                phi_flat = flatten(dict(zip(self.theta_names, self.phi_params)), self.spec)
                g_phi = axpby(1.0, g_phi, b.prox_pull * lam, phi_flat - theta_flat)
            for p, gp in zip(self.phi_params, unflatten(g_phi, self.spec).values()):
                p.grad = gp.clone()
            for p, g_t, g_p in zip(self.head_params, seen["g_psi"], g_psi_direct):
                p.grad = torch.add(g_t, g_p, alpha=b.gamma)
        grad_norm = clip_(self.phi_params + self.head_params, b.clip_norm)
        self.upper_opt.step()
        self.upper_sched.step()
        return {
            "part": "upper", "loss": loss_direct, "loss_theta": seen["loss"], "lr": lr, "lam": lam,
            "grad_norm": grad_norm, **solver_columns(diag), "always_log": True,
        }

    def _direct_term(self, x: Tensor, y: Tensor,
                     seen: dict[str, Any]) -> tuple[Tensor, Sequence[Tensor], Tensor]:
        """``(flat ∇L_D, head gradients, loss)`` of the direct upper term, per ``bissl.direct_term``.

        ``phi`` (the paper): a training forward through φ (its BatchNorm statistics move).
        ``theta``: ``L_D(θ, ψ_D)`` from the hypergradient's own forward, no extra pass: the
        direct term becomes ``γ∇_θ L_D(θ)``, ``γ∇_ψ L_D(θ)``.
        """
        if self.cfg.bissl.direct_term == "theta":
            return seen["v"], seen["g_psi"], seen["loss"]
        loss_phi = downstream_objective(self.phi_net, self.head, (x, y))
        grads = torch.autograd.grad(loss_phi, self.phi_params + self.head_params)
        n = len(self.phi_params)
        return flatten(dict(zip(self.theta_names, grads[:n])), self.spec), grads[n:], loss_phi.detach()

    # ------------------------------------------------------------------ state
    _OPTIMIZERS = ("warmup_opt", "warmup_sched", "lower_opt", "lower_sched", "upper_opt",
                   "upper_sched")

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.models.state_dicts(),
            **{key: getattr(self, key).state_dict() for key in self._OPTIMIZERS},
            **self.batches.state_dict(),
            "lam_schedule": self.lam_schedule.state_dict(),
            "lower_count": self._lower_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.load_state_dicts(state)
        for key in self._OPTIMIZERS:
            getattr(self, key).load_state_dict(state[key])
        self.batches.load_state_dict(state)
        self.lam_schedule.load_state_dict(state["lam_schedule"])
        self._lower_count = state["lower_count"]

    def result(self) -> dict[str, Any]:
        return {"lower_backbone": self.theta_net.state_dict(), "pretext": self.pretext.state_dict(),
                "upper_backbone": self.phi_net.state_dict(), "head": self.head.state_dict()}
