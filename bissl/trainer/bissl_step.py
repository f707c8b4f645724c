"""The BiSSL step, once: lower steps and upper steps on two trainables, for 1 process or N ranks.

:class:`BisslStep` holds the lower copy (θ + ψ_P, a :class:`~bissl.distributed.objectives.LowerObjective`)
and the upper copy (φ + ψ_D, an :class:`~bissl.distributed.objectives.UpperObjective`), each a
:class:`~bissl.distributed.trainable.Trainable` — plain torch or a DeepSpeed engine, one process or
N ranks with their batch shards. Nothing here branches on which.

* **lower step**: ``∇_θ [L_P(θ, ψ_P) + (λ/2)‖θ − φ‖²]`` — the backward of ``L_P`` (averaged across
  ranks), then ``λ(θ − φ)`` added to θ's gradient in place (:meth:`Trainable.grad_pass`: whole
  tensors, or each rank's partition under ZeRO-3, so φ is never gathered), total-norm clipping,
  the optimizer (LARS by default) and BYOL's EMA on lower steps only. The same pass measures
  ``‖∇L_P‖``, ``‖θ − φ‖`` and ``‖φ‖`` for the λ schedule and the metrics.
* **upper step**: ``x = (I + H/(λ + λ_damp))⁻¹ ∇_θ L_D(θ, ψ_D)`` by the core's implicit hypergradient
  (rank-averaged HVPs, sharded under ZeRO-3: :func:`bissl.distributed.hypergrad.distributed_implicit_hypergrad`),
  H the pretext-loss Hessian on the stage's HVP batch; then the upper copy steps on
  ``g_φ = x + γ ∇_φ L_D(φ)``, ``g_ψ = ∇_ψ L_D(θ) + γ ∇_ψ L_D(φ)`` (the gradient of
  ``L_D(θ*(φ), ψ_D) + γ L_D(φ, ψ_D)``) through the surrogate of :class:`UpperObjective`, clipped.

Variants (the thesis' questions): ``direct_term: theta`` (``g_φ = x + γ∇_θ L_D(θ)``,
``g_ψ = (1 + γ)∇_ψ L_D(θ)``, no pass through φ), ``prox_pull: ρ`` (adds ``ρλ(φ − θ)`` to ``g_φ``), a
λ schedule (one λ per step for both levels), the solver and the indefiniteness policy.

A hypergradient with NaN/Inf entries is never zeroed: per ``on_nonfinite`` the upper step is
skipped (φ and ψ_D unchanged, the LR schedule advances; counted, logged, warned every time) or the
run stops naming the step.

BatchNorm policy: training forwards (lower steps, the direct term through φ) update running
statistics; derivative-only passes (HVPs, the downstream pass through θ) use batch statistics and
leave buffers alone (:func:`bissl.ops.batchnorm_stats_frozen`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor
from torch.func import functional_call

from bissl.distributed.collectives import gather_objects
from bissl.distributed.hypergrad import distributed_implicit_hypergrad
from bissl.distributed.objectives import BilevelObjective, LowerObjective
from bissl.distributed.trainable import Trainable
from bissl.hypergrad.lam_schedules import ConstantLam, LamSchedule, LowerStepStats
from bissl.hypergrad.settings import HypergradSettings
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.flat import flat_spec, flatten, unflatten
from bissl.ops.reference import dot_ref
from bissl.solvers import SolverError, SolveResult, Workspace


class SkippedStepWarning(RuntimeWarning):
    """An upper step was skipped because its hypergradient was not finite."""


@dataclass(frozen=True)
class BisslSettings:
    """Everything the BiSSL step needs from the ``bissl`` config section, built once.

    Attributes:
        hyper: the solver settings, passed unchanged to the implicit hypergradient (``hvp_mode``
            is the section's, or ``revrev`` until ``auto`` is resolved on the first upper step).
        hvp_auto: ``bissl.hvp_mode`` is ``auto``.
        gamma, direct_term, prox_pull, on_nonfinite, exact_check_iters: see
            :class:`bissl.config.BisslConfig`.
        shard: partition the solver's vectors across ranks.
        bucket_numel: all-reduce bucket of the hypergradient's vectors (None: one per vector).
    """

    hyper: HypergradSettings
    hvp_auto: bool = False
    gamma: float = 1.0
    direct_term: Literal["phi", "theta"] = "phi"
    prox_pull: float = 0.0
    on_nonfinite: Literal["skip", "raise"] = "skip"
    exact_check_iters: int = 0
    shard: bool = False
    bucket_numel: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> BisslSettings:
        """From a :class:`bissl.config.Config` (its ``bissl`` and ``deepspeed`` sections)."""
        b = cfg.bissl
        auto = b.hvp_mode == "auto"
        hyper = HypergradSettings.from_config(b, hvp_mode="revrev" if auto else None)
        shard = cfg.run.nproc > 1 and cfg.deepspeed.sharded_hypergrad
        return cls(
            hyper=hyper,
            hvp_auto=auto,
            gamma=b.gamma,
            direct_term=b.direct_term,
            prox_pull=b.prox_pull,
            on_nonfinite=b.on_nonfinite,
            exact_check_iters=b.exact_check_iters,
            shard=shard,
            bucket_numel=cfg.deepspeed.hypergrad_bucket_numel,
        )


def _objective(module: Any) -> BilevelObjective:
    """A trainable's module (or functional copy): a lower or upper objective, typed as one."""
    return cast(BilevelObjective, module)


def _backbone_names(trainable: Trainable) -> list[str]:
    return [k for k, _ in _objective(trainable.module).backbone.named_parameters()]


class BisslStep:
    """Lower and upper steps of BiSSL (see the module docstring).

    Args:
        lower: θ + ψ_P under training (module: :class:`LowerObjective`).
        upper: φ + ψ_D under training (module: :class:`UpperObjective`, its ``gamma`` = settings').
        settings: :class:`BisslSettings`.
        lam_schedule: the λ schedule (read once per step by both levels).
        describe: ``() -> str`` naming the current step, for messages.
    """

    def __init__(
        self,
        lower: Trainable,
        upper: Trainable,
        settings: BisslSettings,
        lam_schedule: LamSchedule,
        describe: Callable[[], str],
    ) -> None:
        names = _backbone_names(lower)
        shapes = {k: tuple(p.shape) for k, p in _objective(lower.functional).backbone.named_parameters()}
        if shapes != {k: tuple(p.shape) for k, p in _objective(upper.functional).backbone.named_parameters()}:
            raise ValueError(
                "BisslStep: the lower and upper backbones differ; θ and φ are paired by parameter name and shape"
            )
        self.lower, self.upper, self.settings = lower, upper, settings
        self.lam_schedule, self.describe = lam_schedule, describe
        self.names = names
        self.theta_params = list(_objective(lower.module).backbone.parameters())
        self.phi_params = list(_objective(upper.module).backbone.parameters())
        self.hyper = settings.hyper
        self.lower_count = 0  # lower steps so far (the λ schedule's clock)
        self.skipped = 0  # upper steps skipped for a non-finite hypergradient
        self._mode_resolved = not settings.hvp_auto
        # The hypergradient's solver buffers, kept from one upper step to the next. On CPU a large
        # backbone's fresh (P,) buffers fault in every page on every step (docs/performance.md); on
        # an accelerator the caching allocator already reuses blocks, and a workspace would only
        # pin memory that ZeRO is there to save.
        self._workspace = Workspace() if self.theta_params[0].device.type == "cpu" else None

    # ------------------------------------------------------------------ lower step
    def lower_step(self, views: tuple[Tensor, ...]) -> dict[str, Any]:
        """One lower step on this rank's shard of the pretext views; returns the metrics row."""
        lam, lams = self._lam()
        self.lower.module.train()
        lr = self.lower.lr
        loss = self.lower(views)
        self.lower.backward(loss)

        def add_prox(i: int, w: Tensor, g: Tensor, phi: Tensor) -> Tensor:
            d = w - phi
            sums = torch.stack([dot_ref(g, g), dot_ref(g, d), dot_ref(d, d), dot_ref(phi, phi)])
            g.add_(d, alpha=lam if lams is None else lams[i])
            return sums

        per_tensor = self.lower.grad_pass(add_prox, self.theta_params, [self.upper.param_views(self.phi_params)])
        assert per_tensor is not None  # add_prox returns a tensor for every parameter
        sums = per_tensor.sum(0)
        grad_norm = self.lower.step()
        cast(LowerObjective, self.lower.module).update_target()  # BYOL's EMA on lower steps only
        g2, gd, d2, phi2 = sums.unbind()
        if lams is None:
            lam_gd, lam2_d2, lam_d2 = lam * gd, lam * lam * d2, lam * d2
        else:  # Σ_i over tensors of λ_i·gᵢᵀdᵢ, λ_i²‖dᵢ‖², λ_i‖dᵢ‖²
            w = torch.tensor(lams, dtype=per_tensor.dtype, device=per_tensor.device)
            lam_gd, lam2_d2, lam_d2 = (
                (w * per_tensor[:, 1]).sum(),
                (w * w * per_tensor[:, 2]).sum(),
                (w * per_tensor[:, 2]).sum(),
            )
        prox_grad = lam2_d2.clamp_min(0).sqrt()  # ‖Λ(θ − φ)‖
        total = (g2 + 2 * lam_gd + lam2_d2).clamp_min(0).sqrt()  # ‖∇L_P + Λ(θ − φ)‖
        stats = {
            "pretext_grad_norm": g2.sqrt(),
            "distance": d2.sqrt(),
            "prox_grad_norm": prox_grad,
            "prox_share": torch.where(total > 0, prox_grad / total, torch.zeros_like(total)),
        }
        if not isinstance(self.lam_schedule, ConstantLam):  # adaptive rules read host floats
            per = per_tensor[:, [0, 2]].sqrt().tolist()
            self.lam_schedule.observe(
                LowerStepStats(
                    step=self.lower_count,
                    pretext_grad_norm=float(stats["pretext_grad_norm"]),
                    distance=float(stats["distance"]),
                    phi_norm=math.sqrt(float(phi2)),
                    grad_norms=tuple(g for g, _ in per),
                    distances=tuple(d for _, d in per),
                )
            )
        self.lower_count += 1
        (mean_loss,) = rank_mean(_objective(self.lower.module).last_terms["loss"])
        return {
            "part": "lower",
            "loss": mean_loss,
            "prox": 0.5 * lam_d2,
            "lam": lam,
            "lr": lr,
            "grad_norm": grad_norm,
            **stats,
        }

    def _lam(self) -> tuple[float, tuple[float, ...] | None]:
        """The schedule's λ now: ``(λ, None)``, or for a per-tensor λ ``(their mean, the λ_i)``
        checked against θ's tensors. The first is what the metrics' ``lam`` column logs."""
        value = self.lam_schedule.value
        if not isinstance(value, tuple):
            return value, None
        if len(value) != len(self.names):
            raise ValueError(
                f"lam_schedule gave {len(value)} values of λ but the backbone has {len(self.names)} tensors "
                f"(phase 'bissl', {self.describe()})"
            )
        return sum(value) / len(value), value

    # ------------------------------------------------------------------ upper step
    def upper_step(
        self, hvp_views: tuple[Tensor, ...], batch: tuple[Tensor, Tensor], *, check_exact: bool = False
    ) -> dict[str, Any]:
        """One upper step: the hypergradient on this rank's shard of the stage's HVP views, and
        the upper copy's step on its shard of the downstream batch; returns the metrics row.
        ``check_exact`` (with ``exact_check_iters`` > 0) also logs ``hg_cos_exact``."""
        s = self.settings
        lam, lams = self._lam()
        lam_arg: float | dict[str, float] = lam if lams is None else dict(zip(self.names, lams))
        self.lower.module.train()
        self.upper.module.train()
        lr = self.upper.lr
        seen: dict[str, Any] = {}
        with self.lower.full_state() as low, self.upper.full_state() as up:
            theta_keys = {f"backbone.{k}": k for k in self.names}
            theta = {k: low[key] for key, k in theta_keys.items()}
            lower_rest = {k: v for k, v in low.items() if k not in theta_keys}
            head_keys = {f"head.{k}": k for k, _ in _objective(self.upper.module).head.named_parameters()}
            psi = {k: up[key].detach().requires_grad_(True) for key, k in head_keys.items()}
            # L_D(θ, ψ_D) normalises with θ's batch statistics; θ's own buffers complete the state.
            upper_rest = {
                **{k: v for k, v in lower_rest.items() if k.startswith("backbone.")},
                **{k: v for k, v in up.items() if k.startswith("head.") and k not in head_keys},
            }

            def lower_loss(th: dict[str, Tensor]) -> Tensor:
                state = {**lower_rest, **{f"backbone.{k}": v for k, v in th.items()}}
                return functional_call(self.lower.functional, state, (hvp_views,), strict=True)

            def upper_loss(th: dict[str, Tensor]) -> Tensor:
                state = {
                    **upper_rest,
                    **{f"backbone.{k}": v for k, v in th.items()},
                    **{f"head.{k}": v for k, v in psi.items()},
                }
                with batchnorm_stats_frozen():
                    loss = functional_call(self.upper.functional, state, (batch,), strict=True)
                # One forward gives v = ∇_θ L_D (taken by the core) and ∇_ψ L_D (taken here).
                seen["loss_theta"] = loss.detach()
                seen["g_psi"] = torch.autograd.grad(loss, tuple(psi.values()), retain_graph=True, allow_unused=True)
                return loss

            if s.hvp_auto and not self._mode_resolved:
                self.hyper = self.hyper.replace(hvp_mode=_select_mode(lower_loss, theta))
                self._mode_resolved = True
            keep_v = s.direct_term == "theta"
            try:
                x, info = cast(
                    tuple[dict[str, Tensor], SolveResult],
                    distributed_implicit_hypergrad(
                        lower_loss,
                        upper_loss,
                        theta,
                        lam=lam_arg,
                        settings=self.hyper,
                        shard=s.shard,
                        return_info=True,
                        bucket_numel=s.bucket_numel,
                        on_rhs=(lambda v: seen.__setitem__("v", v)) if keep_v else None,
                        workspace=self._workspace,
                    ),
                )
            except SolverError as err:
                if err.result is None or not bool(err.result.nonfinite):
                    raise SolverError(f"{err} (phase 'bissl', {self.describe()})", result=err.result) from err
                return self._skip(err.result, lr, lam, seen)
            if "g_psi" not in seen:
                raise RuntimeError("implicit_hypergrad did not evaluate upper_loss; cannot form ∇_ψ L_D(θ)")
            spec = flat_spec(theta)
            extra = {}
            if check_exact and s.exact_check_iters > 0:
                extra["hg_cos_exact"] = self._cosine_to_exact(lower_loss, upper_loss, theta, lam_arg, flatten(x, spec))
            g_phi = flatten(x, spec)
            if keep_v:
                g_phi = g_phi + s.gamma * seen["v"]
            if s.prox_pull > 0:
                # ρ·λ(φ − θ): the proximal term's own φ-gradient, pulling φ toward θ.
                phi = flatten({k: up[f"backbone.{k}"] for k in self.names}, spec)
                pull = phi - flatten(theta, spec)
                if lams is None:
                    g_phi = g_phi + (s.prox_pull * lam) * pull
                else:
                    per_entry = torch.tensor(lams, dtype=pull.dtype, device=pull.device)[spec.segment_ids()]
                    g_phi = g_phi + s.prox_pull * per_entry * pull
            head_scale = 1.0 + s.gamma if keep_v else 1.0
            by_name = {
                **{f"backbone.{k}": v for k, v in unflatten(g_phi, spec).items()},
                **{
                    key: (torch.zeros_like(psi[k]) if g is None else g.detach()) * head_scale
                    for (key, k), g in zip(head_keys.items(), seen["g_psi"])
                },
            }
        injected = [by_name[k] for k, _ in self.upper.module.named_parameters()]
        surrogate = self.upper(None if keep_v else batch, injected)
        self.upper.backward(surrogate)
        grad_norm = self.upper.step()
        direct = seen["loss_theta"] if keep_v else _objective(self.upper.module).last_terms["loss"]
        loss, loss_theta = rank_mean(direct, seen["loss_theta"])
        return {
            "part": "upper",
            "loss": loss,
            "loss_theta": loss_theta,
            "lr": lr,
            "lam": lam,
            "grad_norm": grad_norm,
            "skipped": 0,
            **solver_columns(info.summary()),
            **extra,
            "always_log": True,
        }

    def _cosine_to_exact(
        self,
        lower_loss: Callable[[dict[str, Tensor]], Tensor],
        upper_loss: Callable[[dict[str, Tensor]], Tensor],
        theta: dict[str, Tensor],
        lam: float | dict[str, float],
        x: Tensor,
    ) -> float:
        """Cosine between the configured solve ``x`` and the same system solved by MINRES to
        ``exact_check_iters`` iterations (relative residual 1e-10): how far the few-iteration
        hypergradient is from the one the implicit-function theorem defines. MINRES, because it
        converges on symmetric indefinite systems too."""
        s = self.settings
        exact = distributed_implicit_hypergrad(
            lower_loss,
            upper_loss,
            theta,
            lam=lam,
            settings=self.hyper.replace(
                solver="minres", iters=s.exact_check_iters, rtol=1e-10, strict=False, on_indefinite="warn"
            ),
            shard=s.shard,
            bucket_numel=s.bucket_numel,
            workspace=self._workspace,
        )
        e = flatten(cast(dict[str, Tensor], exact), flat_spec(theta))
        denom = math.sqrt(float(dot_ref(x, x)) * float(dot_ref(e, e)))
        return float(dot_ref(x, e)) / denom if denom > 0 else float("nan")

    def _skip(self, result: Any, lr: float, lam: float, seen: dict[str, Any]) -> dict[str, Any]:
        """Skip an upper step whose hypergradient is not finite, or raise (``on_nonfinite``)."""
        where = f"phase 'bissl', {self.describe()}"
        if self.settings.on_nonfinite == "raise":
            raise SolverError(
                f"the hypergradient has NaN/Inf entries ({where}; bissl.on_nonfinite is 'raise')", result=result
            )
        self.skipped += 1
        self.upper.skip_step()
        with warnings.catch_warnings():
            warnings.simplefilter("always", SkippedStepWarning)
            warnings.warn(
                f"BiSSL: skipped the upper step at {self.describe()}: the {result.method} "
                f"solve produced NaN/Inf (skipped {self.skipped} so far; "
                "bissl.on_nonfinite: raise stops instead)",
                SkippedStepWarning,
                stacklevel=3,
            )
        (loss_theta,) = rank_mean(seen.get("loss_theta", torch.tensor(float("nan"))))
        return {
            "part": "upper",
            "loss_theta": loss_theta,
            "lr": lr,
            "lam": lam,
            "skipped": 1,
            **solver_columns(result.summary()),
            "always_log": True,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "lam_schedule": self.lam_schedule.state_dict(),
            "lower_count": self.lower_count,
            "skipped": self.skipped,
            "hvp_mode": self.hyper.hvp_mode,
            "mode_resolved": self._mode_resolved,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam_schedule.load_state_dict(state["lam_schedule"])
        self.lower_count, self.skipped = state["lower_count"], state["skipped"]
        self.hyper = self.hyper.replace(hvp_mode=state["hvp_mode"])
        self._mode_resolved = state["mode_resolved"]


def _select_mode(lower_loss: Callable[[dict[str, Tensor]], Tensor], theta: dict[str, Tensor]) -> str:
    """``hvp_mode: auto``: the first mode that runs on this loss; every rank probes (the loss may
    hold collectives) and all must agree."""
    from bissl.ops.hvp_mode import select_hvp_mode

    mode = select_hvp_mode(lower_loss, theta)
    modes = set(gather_objects(mode))
    if len(modes) != 1:
        raise RuntimeError(f"hvp_mode auto chose different modes on different ranks: {sorted(modes)}")
    return mode


def rank_mean(*values: Tensor) -> list[Tensor]:
    """Scalars averaged across ranks (one collective; identity on one process), for metrics rows:
    every rank then logs, and checks for non-finite values, the same numbers."""
    import torch.distributed as dist

    flat = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    return list(flat.unbind())


def solver_columns(diag: dict[str, Any]) -> dict[str, Any]:
    """The ``cg_*`` metrics columns of an upper step from :meth:`bissl.solvers.SolveResult.summary`."""
    return {
        "cg_iters": diag["iters"],
        "cg_residual": diag["residual_norm"],
        "cg_converged": diag["converged"],
        "cg_negative_curvature": diag["negative_curvature"],
        "cg_nonfinite": diag["nonfinite"],
        "cg_indefinite": diag["indefinite"],
        # Estimates a solver cannot give are NaN in the summary; logged as empty cells.
        **{
            f"cg_{k}": None if math.isnan(diag[k]) else diag[k]
            for k in ("ritz_min", "ritz_max", "condition", "damping_used")
        },
        "cg_action": diag["action"],
    }
