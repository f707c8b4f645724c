"""Pipeline step 2 on several ranks: the BiSSL stage with both copies under DeepSpeed engines.

Same semantics as :class:`~bissl.trainer.bissl_phase.BisslPhase` (the schedule, start, batches,
optimizers and schedules come from :mod:`bissl.trainer.bissl_stage`), executed data-parallel:

* every rank draws the same **global** batch (same sampler and augmentation generator) and keeps
  its shard (:func:`bissl.distributed.sharding.shard_of`), so the global batch sizes are the
  config's;
* **head warm-up** runs before the engines exist, on plain modules: each rank's ψ_D gradient on its
  shard is averaged (one flat all-reduce with the loss), then the same SGD step on every rank. φ is
  in eval mode there, so the shard-averaged loss is exactly the global one;
* **lower steps** run through the lower engine (``L_P + (λ/2)‖θ − φ‖²``; DeepSpeed averages the
  gradients, clips and steps), **upper steps** compute ``x`` with the rank-averaged CG of
  :func:`bissl.distributed.step.hypergradient` and let the upper engine apply
  ``(x + γ∇_φ L_D(φ), ∇_ψ L_D(θ) + γ∇_ψ L_D(φ))``; ZeRO stage 0-3 per the ``deepspeed:`` section.
  The engines are built at the first lower/upper step (after the warm-up, which trains ψ_D outside
  them: ZeRO ≥ 1 keeps its own master copy of the parameters it optimises);
* BatchNorm policy as BisslPhase (training forwards update running statistics; HVPs and the
  downstream pass through θ do not). Each rank normalises with its own shard's statistics (no
  SyncBN) and SimCLR's negatives come from its own shard, so with several ranks the stage optimises
  the average of the per-shard losses (:func:`bissl.distributed.reference.reference_bissl_step`);
  the running statistics are averaged across ranks after every step, so all ranks hold one model;
* logged losses are averaged across ranks, so every rank computes the same metrics row (only rank
  0 writes it) and all ranks agree on raising for a non-finite loss.

Checkpoints: :meth:`save_engines` (all ranks, DeepSpeed's format, ZeRO-partitioned states one file
per rank) plus :meth:`state_dict` (what is outside the engines: data order, generators; during the
warm-up, the plain modules and the warm-up optimizer). :func:`bissl.trainer.distributed_run.run_zero_phase`
drives both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bissl.config import Config, ConfigError
from bissl.distributed.collectives import allreduce_mean_, allreduce_mean_tensors_, rank, world_size
from bissl.distributed.objectives import LowerObjective, UpperObjective, gathered
from bissl.distributed.sharding import check_shardable, shard_of
from bissl.distributed.step import HypergradSettings, average_buffers_, hypergradient, phi_snapshot
from bissl.solvers import SolverError
from bissl.trainer.bissl_stage import (
    PHASE, StageBatches, StageSchedule, downstream_objective, lower_optimizer, lower_schedule,
    pretext_objective, solver_columns, start_models, upper_optimizer, upper_schedule, warmup_loss,
    warmup_optimizer,
)
from bissl.trainer.builders import PipelineData, current_lr
from bissl.trainer.loop import NonFiniteLossError, Phase, RunContext


def hypergrad_settings(cfg: Config) -> HypergradSettings:
    """The upper step's solver settings from the ``bissl`` section."""
    b = cfg.bissl
    return HypergradSettings(damping=b.damping, iters=b.cg_iters, solver=b.solver,
                             hvp_mode=b.hvp_mode or "revrev", strict=b.strict,
                             on_indefinite=b.on_indefinite, fallback=b.fallback_solver,
                             backend=b.backend)


class ZeroBisslPhase(Phase):
    """The BiSSL stage under DeepSpeed engines on ``world_size()`` ranks (call on every rank).

    Args:
        cfg, data, ctx: experiment config, tensors, run context (``ctx.device``: this rank's).
        pretext_result: ``{"backbone", "pretext"}`` state dicts from the pretext phase.
        engine_dir: where the engines' checkpoints go (shared by all ranks).
    """

    name = PHASE

    def __init__(self, cfg: Config, data: PipelineData, ctx: RunContext, pretext_result: dict[str, Any],
                 *, engine_dir: str | Path) -> None:
        self.cfg, self.device = cfg, ctx.device
        self.rank, self.world = rank(), world_size()
        self.models = start_models(cfg, data, ctx.device, pretext_result)
        self.batches = StageBatches(cfg, data, ctx.seed, ctx.device)
        self.schedule = StageSchedule.from_config(cfg, self.batches.upper_sampler.steps_per_epoch)
        super().__init__(self.schedule.total_steps)
        self._check_shards()
        m = self.models
        self.head_params = list(m.head.parameters())
        self.warmup_opt, self.warmup_sched = warmup_optimizer(cfg, self.head_params, self.schedule.warmup_steps)
        b = cfg.bissl
        self.lower = LowerObjective(m.theta_net, m.pretext, pretext_objective, lam=b.lam)
        self.upper = UpperObjective(m.phi_net, m.head, downstream_objective, gamma=b.gamma)
        self.hyper = hypergrad_settings(cfg)
        self.engines = None
        self.engine_dir = Path(engine_dir)
        self.engine_tag: str | None = None
        self._phi: dict[str, Tensor] | None = None  # φ snapshot of the current lower block

    def _check_shards(self) -> None:
        """Global batch sizes (after the sampler's cap at the data size) must split evenly."""
        b, bt = self.cfg.bissl, self.batches
        try:
            check_shardable(bt.lower_sampler.batch_size, self.world, "'bissl.lower.batch_size'", min_shard=2)
            check_shardable(bt.upper_sampler.batch_size, self.world, "'bissl.upper.batch_size'")
            what = "'bissl.hvp_batch_size'" if b.hvp_batch_size else "'bissl.lower.batch_size' (the HVP batch)"
            check_shardable(bt.hvp_batch_size, self.world, what, min_shard=2)
        except ValueError as err:
            raise ConfigError(f"{err} (after capping at the dataset size)") from None

    # ------------------------------------------------------------------ schedule
    def describe_step(self, step: int) -> str:
        return self.schedule.describe(step)

    def step(self) -> list[dict[str, Any]]:
        part, stage, _ = self.schedule.locate(self.step_idx)
        if part == "warmup":
            row = self._warmup_step()
        else:
            self._ensure_engines()
            row = self._lower_step() if part == "lower" else self._upper_step(stage)
        self.step_idx += 1
        row.setdefault("round", stage + 1 if stage >= 0 else self.batches.upper_sampler.epoch + 1)
        return [row]

    # ------------------------------------------------------------------ engines
    def _ensure_engines(self) -> None:
        if self.engines is not None:
            return
        from bissl.distributed.engines import build_bilevel_engines  # imports DeepSpeed

        cfg, b = self.cfg, self.cfg.bissl
        # The last warm-up gradient is still on ψ_D; an engine's backward would add to it.
        self.warmup_opt.zero_grad(set_to_none=True)
        self.engines = build_bilevel_engines(
            self.lower, self.upper,
            lower_optimizer=lower_optimizer(cfg, [p for p in self.lower.parameters() if p.requires_grad]),
            upper_optimizer=upper_optimizer(cfg, [p for p in self.upper.parameters() if p.requires_grad]),
            settings=cfg.deepspeed, lower_clip_norm=b.clip_norm, upper_clip_norm=b.clip_norm,
            lower_scheduler=lambda opt: lower_schedule(cfg, opt),
            upper_scheduler=lambda opt: upper_schedule(cfg, opt))

    def _engine_step(self, engine: Any, loss: Tensor) -> Tensor | float:
        """Backward, averaging, clipping and the optimizer step of one engine; returns the total
        gradient norm before clipping (identical on every rank)."""
        engine.backward(loss)
        norm = None
        if self.engines.zero_stage == 0:
            # Stage 0 keeps the averaged gradients on the parameters until the step.
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in engine.module.parameters() if p.grad is not None])
        skipped = engine.skipped_steps
        engine.step()
        if engine.skipped_steps != skipped:
            # ZeRO >= 1 skips a step whose gradient norm is not finite instead of applying it.
            raise NonFiniteLossError(
                f"non-finite gradient in phase '{self.name}' at {self.describe_step(self.step_idx + 1)}"
                " (DeepSpeed skipped the step). Lower the learning rate or raise the damping, and "
                "start a new run directory")
        return norm if norm is not None else engine.get_global_grad_norm()

    def _mean(self, *values: Tensor) -> list[Tensor]:
        """Scalars averaged across ranks (one collective), for the metrics row."""
        flat = torch.stack([v.detach().reshape(()).to(torch.float32) for v in values])
        allreduce_mean_(flat)
        return list(flat.unbind())

    # ------------------------------------------------------------------ the three kinds of step
    def _warmup_step(self) -> dict[str, Any]:
        x, y = shard_of(self.batches.downstream(), self.rank, self.world)
        lr = current_lr(self.warmup_opt)
        loss = warmup_loss(self.models.phi_net, self.models.head, x, y)
        self.warmup_opt.zero_grad(set_to_none=True)
        loss.backward()
        mean_loss = loss.detach().reshape(1).clone()
        # Equal shards and φ in eval mode: the mean of the shard gradients is the global gradient.
        allreduce_mean_tensors_([p.grad for p in self.head_params] + [mean_loss])
        self.warmup_opt.step()
        self.warmup_sched.step()
        return {"part": "warmup", "loss": mean_loss[0], "lr": lr}

    def _lower_step(self) -> dict[str, Any]:
        views = shard_of(self.batches.lower_views(), self.rank, self.world)
        self.lower.train()
        if self._phi is None:
            self._phi = phi_snapshot(self.engines)  # φ is constant during the lower block
        engine = self.engines.lower
        lr = float(engine.get_lr()[0])
        loss = engine(views, self._phi)
        grad_norm = self._engine_step(engine, loss)
        self.models.pretext.update_target(self.models.theta_net)  # BYOL EMA on lower steps only
        average_buffers_(self.lower, bucket_numel=self.engines.settings.hypergrad_bucket_numel)
        terms = self.lower.last_terms
        mean_loss, prox = self._mean(terms["loss"], terms["prox"])
        return {"part": "lower", "loss": mean_loss, "prox": prox, "lam": self.lower.lam, "lr": lr,
                "grad_norm": grad_norm}

    def _upper_step(self, stage: int) -> dict[str, Any]:
        self._phi = None  # φ moves from here on
        hvp_views = shard_of(self.batches.hvp_views(stage), self.rank, self.world)
        batch = shard_of(self.batches.downstream(), self.rank, self.world)
        self.lower.train()
        self.upper.train()
        try:
            injected, info = hypergradient(self.engines, hvp_views, batch, self.hyper)
        except SolverError as err:
            raise SolverError(f"{err} (phase '{self.name}', {self.describe_step(self.step_idx + 1)}; "
                              "bissl.strict is true)") from err
        diag = info["solve"].summary()  # identical on every rank: it comes from averaged vectors
        engine = self.engines.upper
        lr = float(engine.get_lr()[0])
        loss = engine(batch, injected)
        grad_norm = self._engine_step(engine, loss)
        average_buffers_(self.upper, bucket_numel=self.engines.settings.hypergrad_bucket_numel)
        loss_phi, loss_theta = self._mean(self.upper.last_terms["loss"], info["loss_theta"])
        return {"part": "upper", "loss": loss_phi, "loss_theta": loss_theta, "lam": self.lower.lam,
                "lr": lr, "grad_norm": grad_norm, **solver_columns(diag), "always_log": True}

    # ------------------------------------------------------------------ state
    def save_engines(self, tag: str) -> None:
        """Checkpoint both engines under ``engine_dir`` as ``tag`` (all ranks; a no-op during the
        head warm-up, before the engines exist). :meth:`state_dict` then names the tag."""
        if self.engines is None:
            self.engine_tag = None
            return
        from bissl.distributed.engines import save_checkpoint

        save_checkpoint(self.engines, self.engine_dir, tag)
        self.engine_tag = tag

    def state_dict(self) -> dict[str, Any]:
        """Everything outside the engines (identical on every rank); with no engines yet, the
        plain modules and the warm-up optimizer too."""
        state: dict[str, Any] = {"batches": self.batches.state_dict(), "engine_tag": self.engine_tag,
                                 "world_size": self.world}
        if self.engines is None:
            state.update(models=self.models.state_dicts(), warmup_opt=self.warmup_opt.state_dict(),
                         warmup_sched=self.warmup_sched.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (+ :meth:`save_engines`); all ranks, same world size."""
        if state["world_size"] != self.world:
            raise ConfigError(f"the BiSSL checkpoint was written by {state['world_size']} ranks, this "
                              f"run has {self.world} ('run.nproc' must not change on resume)")
        self.batches.load_state_dict(state["batches"])
        self._phi = None
        if state["engine_tag"] is None:
            self.models.load_state_dicts(state["models"])
            self.warmup_opt.load_state_dict(state["warmup_opt"])
            self.warmup_sched.load_state_dict(state["warmup_sched"])
            return
        from bissl.distributed.engines import load_checkpoint

        self._ensure_engines()
        load_checkpoint(self.engines, self.engine_dir, state["engine_tag"])
        self.engine_tag = state["engine_tag"]

    def result(self) -> dict[str, Any]:
        """As BisslPhase's: full state dicts (gathered under ZeRO-3; all ranks must call it)."""
        m = self.models

        def full(module: torch.nn.Module) -> dict[str, Tensor]:
            with gathered(module.parameters()):
                return {k: v.detach().clone() for k, v in module.state_dict().items()}

        return {"lower_backbone": full(m.theta_net), "pretext": full(m.pretext),
                "upper_backbone": full(m.phi_net), "head": full(m.head)}
