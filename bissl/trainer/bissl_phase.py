"""Pipeline step 2: the BiSSL bilevel stage, on one process or N ranks.

Start (:func:`~bissl.trainer.bissl_stage.start_models`): the lower model (θ + ψ_P) is the pretext
result (BYOL: its target is re-initialised from the online network); the upper model is a copy φ
of the same backbone with a new downstream head ψ_D. Then

1. **head warm-up**: ``bissl.head_warmup_epochs`` epochs of SGD on ψ_D with φ frozen (eval mode,
   so φ's BatchNorm statistics do not move either), at the upper lr/wd; with N ranks each takes its
   shard and the head's gradients are averaged (φ in eval mode: the shard average is the global
   loss). The head is small, so it trains as a plain model whatever the ZeRO stage;
2. ``bissl.stages`` **training stages**, each ``lower_steps`` lower steps then ``upper_steps``
   upper steps of :class:`~bissl.trainer.bissl_step.BisslStep`, the one BiSSL step. Its two copies
   are :class:`~bissl.distributed.trainable.Trainable` objects — plain torch, or DeepSpeed engines
   under ZeRO 1-3 — built after the warm-up (ZeRO keeps its own copy of what it optimises); the
   HVP batch of a stage is drawn once and reused for all its upper steps.

Checkpoints: :meth:`state_dict` (data order, generators, the λ schedule, and the plain models'
states) in the rank-0 file; under DeepSpeed :meth:`save_engines` writes each engine's partitions
(all ranks) and the file names them (:func:`bissl.trainer.loop.run_phase`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bissl.config import Config, ConfigError
from bissl.distributed.objectives import LowerObjective, UpperObjective
from bissl.distributed.trainable import DataParallel, Trainable
from bissl.distributed.zero3 import full_state_dict
from bissl.hypergrad.lam_schedules import build_lam_schedule
from bissl.tasks.downstream import classification_loss
from bissl.trainer.bissl_stage import (
    PHASE,
    StageBatches,
    StageSchedule,
    downstream_objective,
    lower_schedule,
    lower_spec,
    pretext_objective,
    start_models,
    upper_schedule,
    upper_spec,
    warmup_schedule,
    warmup_spec,
)
from bissl.trainer.bissl_step import BisslSettings, BisslStep, rank_mean
from bissl.trainer.builders import PipelineData
from bissl.trainer.loop import Phase, RunContext


class BisslPhase(Phase):
    """The BiSSL stage as ``W + stages·(lower_steps + upper_steps)`` steps (W: head warm-up steps).

    Args:
        cfg, data, ctx: experiment config, tensors, run context.
        pretext_result: ``{"backbone", "pretext"}`` state dicts from the pretext phase.
        dp: the data-parallel layout (default: one process).
        name: the phase name (``"bissl"``; ``"bissl_upper0"`` for the ablation arm).
    """

    name = PHASE

    def __init__(
        self,
        cfg: Config,
        data: PipelineData,
        ctx: RunContext,
        pretext_result: dict[str, Any],
        dp: DataParallel | None = None,
        name: str = PHASE,
    ) -> None:
        self.name = name
        self.cfg, self.device = cfg, ctx.device
        self.dp = dp or DataParallel()
        self.models = start_models(cfg, data, ctx.device, pretext_result)
        self.batches = StageBatches(cfg, data, ctx.seed, ctx.device, self.dp)
        self.batches.check_shards()
        self.schedule = StageSchedule.from_config(cfg, self.batches.upper_sampler.steps_per_epoch)
        super().__init__(self.schedule.total_steps)
        # The head warm-up trains ψ_D alone, data-parallel but never sharded (it is small).
        self.warmup: Trainable = DataParallel(self.dp.world, self.dp.rank).trainable(
            self.models.head, warmup_spec(cfg), warmup_schedule(cfg, self.schedule.warmup_steps)
        )
        self.settings = BisslSettings.from_config(cfg)
        b = cfg.bissl
        self.lam_schedule = build_lam_schedule(b.lam_schedule, b.lam, b.lam_options)
        self.step_fn: BisslStep | None = None  # built after the warm-up

    # ------------------------------------------------------------------ the models, by their names
    theta_net = property(lambda self: self.models.theta_net, doc="θ, the lower backbone")
    pretext = property(lambda self: self.models.pretext, doc="ψ_P, the pretext head")
    phi_net = property(lambda self: self.models.phi_net, doc="φ, the upper backbone")
    head = property(lambda self: self.models.head, doc="ψ_D, the downstream head")

    @property
    def lower_params(self) -> list[torch.nn.Parameter]:
        """The trained parameters of the lower copy: θ, then ψ_P's."""
        return [p for m in (self.theta_net, self.pretext) for p in m.parameters() if p.requires_grad]

    @property
    def phi_params(self) -> list[torch.nn.Parameter]:
        return list(self.phi_net.parameters())

    @property
    def head_params(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    # ------------------------------------------------------------------ schedule
    @property
    def warmup_steps(self) -> int:
        return self.schedule.warmup_steps

    def locate(self, step: int) -> tuple[str, int, int]:
        """``(part, stage, k)`` of 0-based step ``step`` (see :meth:`StageSchedule.locate`)."""
        return self.schedule.locate(step)

    def describe_step(self, step: int) -> str:
        return self.schedule.describe(step)

    def step(self) -> list[dict[str, Any]]:
        part, stage, k = self.schedule.locate(self.step_idx)
        if part == "warmup":
            row = self._warmup_step()
        else:
            step_fn = self._ensure_copies()
            if part == "lower":
                row = step_fn.lower_step(self.batches.lower_views())
            else:
                row = step_fn.upper_step(self.batches.hvp_views(stage), self.batches.downstream(), check_exact=k == 0)
        self.step_idx += 1
        row.setdefault("round", stage + 1 if stage >= 0 else self.batches.upper_sampler.epoch + 1)
        return [row]

    def _warmup_step(self) -> dict[str, Any]:
        x, y = self.batches.downstream()
        phi_net, head = self.models.phi_net, self.models.head
        phi_net.eval()
        head.train()
        with torch.no_grad():
            feats = phi_net(x)
        lr = self.warmup.lr
        loss = classification_loss(self.warmup(feats), y)
        self.warmup.backward(loss)
        self.warmup.step()
        (mean_loss,) = rank_mean(loss)
        return {"part": "warmup", "loss": mean_loss, "lr": lr}

    def _ensure_copies(self) -> BisslStep:
        """The two trained copies and the BiSSL step, built at the first lower/upper step."""
        if self.step_fn is None:
            cfg, m = self.cfg, self.models
            # The head moves into the upper copy; its last warm-up gradient must not be added to
            # the first upper step's (an engine's backward accumulates into it).
            self.warmup.zero_grad()
            lower = self.dp.trainable(
                LowerObjective(m.theta_net, m.pretext, pretext_objective), lower_spec(cfg), lower_schedule(cfg)
            )
            upper = self.dp.trainable(
                UpperObjective(m.phi_net, m.head, downstream_objective, gamma=cfg.bissl.gamma),
                upper_spec(cfg),
                upper_schedule(cfg),
            )
            self.step_fn = BisslStep(
                lower, upper, self.settings, self.lam_schedule, lambda: self.describe_step(self.step_idx + 1)
            )
        return self.step_fn

    # ------------------------------------------------------------------ state
    def save_engines(self, directory: Path, tag: str) -> bool:
        """Checkpoint both copies' engines under ``directory`` as ``tag`` (all ranks); False (and
        nothing written) for plain models or before the copies exist."""
        if self.step_fn is None or self.dp.zero_stage < 1:
            return False
        self.step_fn.lower.save(directory / "lower", tag)
        self.step_fn.upper.save(directory / "upper", tag)
        return True

    def load_engines(self, directory: Path, tag: str) -> None:
        step_fn = self._ensure_copies()
        step_fn.lower.load(directory / "lower", tag)
        step_fn.upper.load(directory / "upper", tag)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "batches": self.batches.state_dict(),
            "world_size": self.dp.world,
            "copies": self.step_fn is not None,
        }
        if self.step_fn is None:
            state.update(
                models=self.models.state_dicts(),
                warmup=self.warmup.state_dict(),
                lam_schedule=self.lam_schedule.state_dict(),
            )
        else:
            state.update(
                lower=self.step_fn.lower.state_dict(),
                upper=self.step_fn.upper.state_dict(),
                step=self.step_fn.state_dict(),
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.dp.world:
            raise ConfigError(
                f"the BiSSL checkpoint was written by {state['world_size']} ranks, this "
                f"run has {self.dp.world} ('run.nproc' must not change on resume)"
            )
        self.batches.load_state_dict(state["batches"])
        if not state["copies"]:
            self.models.load_state_dicts(state["models"])
            self.warmup.load_state_dict(state["warmup"])
            self.lam_schedule.load_state_dict(state["lam_schedule"])
            return
        step_fn = self._ensure_copies()
        step_fn.lower.load_state_dict(state["lower"])
        step_fn.upper.load_state_dict(state["upper"])
        step_fn.load_state_dict(state["step"])

    def result(self) -> dict[str, Any]:
        """Full state dicts of both copies (gathered under ZeRO-3; every rank must call it)."""
        m = self.models
        return {
            "lower_backbone": full_state_dict(m.theta_net),
            "pretext": full_state_dict(m.pretext),
            "upper_backbone": full_state_dict(m.phi_net),
            "head": full_state_dict(m.head),
        }
