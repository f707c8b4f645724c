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
from bissl.tasks.downstream import build_head, classification_loss
from bissl.trainer.builders import (
    PipelineData, build_backbone_from, build_downstream_augment, build_pretext_from, build_two_view,
    clip_, cosine, current_lr, epochs_to_steps, lars, sgd,
)
from bissl.trainer.loop import Phase, RunContext
from bissl.trainer.rng import derive_seed, make_generator
from bissl.trainer.sampler import EpochSampler, gather


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
        # Lower model: θ and ψ_P from the pretext checkpoint.
        self.theta_net = build_backbone_from(cfg, data, ctx.device)
        self.theta_net.load_state_dict(pretext_result["backbone"])
        self.pretext = build_pretext_from(cfg, self.theta_net, ctx.device)
        self.pretext.load_state_dict(pretext_result["pretext"])
        self.pretext.reset_target(self.theta_net)  # BYOL: target := online (SimCLR: no-op)
        # Upper model: φ = a copy of the same backbone, new downstream head ψ_D.
        self.phi_net = build_backbone_from(cfg, data, ctx.device)
        self.phi_net.load_state_dict(pretext_result["backbone"])
        self.head = build_head(self.phi_net.out_dim, data.num_classes, cfg.finetune.head).to(ctx.device)

        self.theta_params = list(self.theta_net.parameters())
        self.theta_names = [n for n, _ in self.theta_net.named_parameters()]
        self.phi_params = list(self.phi_net.parameters())
        self.head_params = list(self.head.parameters())
        self.lower_params = self.theta_params + list(self.pretext.online_parameters())
        self.spec = flat_spec(dict(self.theta_net.named_parameters()))

        self.lower_sampler = EpochSampler(len(data.pretext_x), b.lower.batch_size,
                                          derive_seed(ctx.seed, self.name, "lower_order"))
        self.upper_sampler = EpochSampler(len(data.train_x), b.upper.batch_size,
                                          derive_seed(ctx.seed, self.name, "upper_order"))
        self.warmup_steps = epochs_to_steps(b.head_warmup_epochs, self.upper_sampler.steps_per_epoch)
        self.cycle = b.lower_steps + b.upper_steps
        super().__init__(self.warmup_steps + b.stages * self.cycle)

        up, lo = b.upper, b.lower
        self.warmup_opt = sgd(self.head_params, up.lr, up.momentum, up.weight_decay)
        self.warmup_sched = cosine(self.warmup_opt, self.warmup_steps, 0, up.final_lr_factor)
        self.lower_opt = lars(self.lower_params, lo.lr, lo.momentum, lo.weight_decay, lo.eta)
        self.lower_sched = cosine(self.lower_opt, b.stages * b.lower_steps, lo.warmup_steps,
                                  lo.final_lr_factor)
        self.upper_opt = sgd(self.phi_params + self.head_params, up.lr, up.momentum, up.weight_decay)
        self.upper_sched = cosine(self.upper_opt, b.stages * b.upper_steps, 0, up.final_lr_factor)

        self.two_view = build_two_view(cfg, data)
        self.down_aug = build_downstream_augment(cfg, data)
        self.lower_gen = make_generator(derive_seed(ctx.seed, self.name, "lower_augment"), ctx.device)
        self.upper_gen = make_generator(derive_seed(ctx.seed, self.name, "upper_augment"), ctx.device)
        self.hvp_batch_size = min(b.hvp_batch_size or lo.batch_size, len(data.pretext_x))
        self._hvp_views: tuple[int, tuple[Tensor, ...]] | None = None
        self._warned_nonfinite = False
        # One λ for the lower problem and the upper step's IFT (bissl.hypergrad.lam_schedules).
        self.lam_schedule = build_lam_schedule(b.lam_schedule, b.lam, b.lam_options)
        self._lower_count = 0

    # ------------------------------------------------------------------ schedule
    def locate(self, step: int) -> tuple[str, int, int]:
        """``(part, stage, k)`` of 0-based step ``step``: part in warmup/lower/upper, stage 0-based
        (-1 in warm-up), k the index within the warm-up or within the stage's lower/upper block."""
        if step < self.warmup_steps:
            return "warmup", -1, step
        stage, k = divmod(step - self.warmup_steps, self.cycle)
        lower = self.cfg.bissl.lower_steps
        return ("lower", stage, k) if k < lower else ("upper", stage, k - lower)

    def describe_step(self, step: int) -> str:
        part, stage, k = self.locate(step - 1)
        b = self.cfg.bissl
        if part == "warmup":
            return f"head warm-up step {k + 1} of {self.warmup_steps}"
        count = b.lower_steps if part == "lower" else b.upper_steps
        return f"{part} step {k + 1} of {count} in training stage {stage + 1} of {b.stages}"

    def step(self) -> list[dict[str, Any]]:
        part, stage, _ = self.locate(self.step_idx)
        if part == "warmup":
            row = self._warmup_step()
        elif part == "lower":
            row = self._lower_step()
        else:
            row = self._upper_step(stage)
        self.step_idx += 1
        row.setdefault("round", stage + 1 if stage >= 0 else self.upper_sampler.epoch + 1)
        return [row]

    # ------------------------------------------------------------------ the three kinds of step
    def _downstream_batch(self) -> tuple[Tensor, Tensor]:
        idx = self.upper_sampler.next_batch()
        x, y = gather(self.data.train_x, idx, self.device), gather(self.data.train_y, idx, self.device)
        if self.down_aug is not None:
            x = self.down_aug(x, self.upper_gen)
        return x, y

    def _warmup_step(self) -> dict[str, Any]:
        x, y = self._downstream_batch()
        self.phi_net.eval()
        self.head.train()
        with torch.no_grad():
            feats = self.phi_net(x)
        lr = current_lr(self.warmup_opt)
        loss = classification_loss(self.head(feats), y)
        self.warmup_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.warmup_opt.step()
        self.warmup_sched.step()
        return {"part": "warmup", "loss": loss.detach(), "lr": lr}

    def _lower_step(self) -> dict[str, Any]:
        lam = self.lam_schedule.value
        self.theta_net.train()
        self.pretext.train()
        x = gather(self.data.pretext_x, self.lower_sampler.next_batch(), self.device)
        views = self.two_view(x, self.lower_gen)
        lr = current_lr(self.lower_opt)
        loss = self.pretext.loss(self.theta_net, *views)
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

    def _hvp_batch(self, stage: int) -> tuple[Tensor, ...]:
        """The stage's pretext batch and its two views for H: a function of (seed, stage) only, so
        a run resumed in the middle of a stage's upper steps redraws exactly the same batch."""
        if self._hvp_views is None or self._hvp_views[0] != stage:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.name, "hvp_batch", stage))
            idx = torch.randperm(len(self.data.pretext_x), generator=gen)[: self.hvp_batch_size]
            x = gather(self.data.pretext_x, idx, self.device)
            aug_gen = make_generator(derive_seed(self.seed, self.name, "hvp_augment", stage), self.device)
            self._hvp_views = (stage, tuple(self.two_view(x, aug_gen)))
        return self._hvp_views[1]

    def _upper_step(self, stage: int) -> dict[str, Any]:
        b = self.cfg.bissl
        hvp_views = self._hvp_batch(stage)
        x, y = self._downstream_batch()
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
            "grad_norm": grad_norm, "cg_iters": diag["iters"], "cg_residual": diag["residual_norm"],
            "cg_converged": diag["converged"], "cg_negative_curvature": diag["negative_curvature"],
            "cg_nonfinite": diag["nonfinite"], "cg_indefinite": diag["indefinite"],
            # Estimates a solver cannot give are NaN in the summary; logged as empty cells.
            **{f"cg_{k}": None if math.isnan(diag[k]) else diag[k]
               for k in ("ritz_min", "ritz_max", "condition", "damping_used")},
            "cg_action": diag["action"], "always_log": True,
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
        loss_phi = classification_loss(self.head(self.phi_net(x)), y)
        grads = torch.autograd.grad(loss_phi, self.phi_params + self.head_params)
        n = len(self.phi_params)
        return flatten(dict(zip(self.theta_names, grads[:n])), self.spec), grads[n:], loss_phi.detach()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "theta_net": self.theta_net.state_dict(),
            "pretext": self.pretext.state_dict(),
            "phi_net": self.phi_net.state_dict(),
            "head": self.head.state_dict(),
            "warmup_opt": self.warmup_opt.state_dict(),
            "warmup_sched": self.warmup_sched.state_dict(),
            "lower_opt": self.lower_opt.state_dict(),
            "lower_sched": self.lower_sched.state_dict(),
            "upper_opt": self.upper_opt.state_dict(),
            "upper_sched": self.upper_sched.state_dict(),
            "lower_sampler": self.lower_sampler.state_dict(),
            "upper_sampler": self.upper_sampler.state_dict(),
            "lower_gen": self.lower_gen.get_state(),
            "upper_gen": self.upper_gen.get_state(),
            "lam_schedule": self.lam_schedule.state_dict(),
            "lower_count": self._lower_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("theta_net", "pretext", "phi_net", "head", "warmup_opt", "warmup_sched",
                    "lower_opt", "lower_sched", "upper_opt", "upper_sched", "lower_sampler",
                    "upper_sampler"):
            getattr(self, key).load_state_dict(state[key])
        self.lower_gen.set_state(state["lower_gen"])
        self.upper_gen.set_state(state["upper_gen"])
        self.lam_schedule.load_state_dict(state["lam_schedule"])
        self._lower_count = state["lower_count"]
        self._hvp_views = None

    def result(self) -> dict[str, Any]:
        return {"lower_backbone": self.theta_net.state_dict(), "pretext": self.pretext.state_dict(),
                "upper_backbone": self.phi_net.state_dict(), "head": self.head.state_dict()}
