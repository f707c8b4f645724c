"""Pipeline step 1: self-supervised pretraining (SimCLR or BYOL) with LARS and a cosine schedule.

The same phase, started from a finished pretext result with the lower-level optimizer settings,
is the compute-matched continuation of the baseline (``baseline.compute_matched``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bissl.config import Config
from bissl.trainer.builders import (
    PipelineData, build_backbone_from, build_pretext_from, build_two_view, cosine, current_lr, lars,
    pretext_optimizer,
)
from bissl.trainer.loop import Phase, RunContext
from bissl.trainer.rng import derive_seed, make_generator
from bissl.trainer.sampler import EpochSampler, gather


@dataclass(frozen=True)
class LarsSchedule:
    """LARS settings and the cosine schedule of one pretext-loss optimization."""

    lr: float
    momentum: float
    weight_decay: float
    eta: float
    warmup_steps: int
    final_lr_factor: float
    batch_size: int


class PretextPhase(Phase):
    """Minimise the pretext loss ``L_P`` over the backbone and the pretext head.

    Args:
        name: phase name (``"pretext"``, or ``"pretext_matched"`` for the compute-matched baseline).
        cfg, data, ctx: experiment config, tensors, run context.
        total_steps: optimizer steps; ``None`` means ``pretext.epochs`` epochs.
        opt: LARS/schedule settings; ``None`` means the ``pretext`` section's (warm-up in epochs).
        init: a previous pretext result to start from (``{"backbone", "pretext"}`` state dicts).
    """

    def __init__(self, name: str, cfg: Config, data: PipelineData, ctx: RunContext, *,
                 total_steps: int | None = None, opt: LarsSchedule | None = None,
                 init: dict[str, Any] | None = None) -> None:
        p = cfg.pretext
        self.name = name
        self.cfg, self.data, self.device = cfg, data, ctx.device
        batch = opt.batch_size if opt is not None else p.batch_size
        self.sampler = EpochSampler(len(data.pretext_x), batch, derive_seed(ctx.seed, name, "order"))
        spe = self.sampler.steps_per_epoch
        own_optimizer = opt is None  # the pretext section's optimizer, else LARS with `opt`
        if opt is None:
            opt = LarsSchedule(p.lr, p.momentum, p.weight_decay, p.eta,
                               int(round(p.warmup_epochs * spe)), p.final_lr_factor, batch)
        super().__init__(p.epochs * spe if total_steps is None else total_steps)
        self.backbone = build_backbone_from(cfg, data, ctx.device)
        self.pretext = build_pretext_from(cfg, self.backbone, ctx.device)
        if init is not None:
            self.backbone.load_state_dict(init["backbone"])
            self.pretext.load_state_dict(init["pretext"])
        self.params = list(self.backbone.parameters()) + list(self.pretext.online_parameters())
        self.optimizer = (pretext_optimizer(cfg, self.params) if own_optimizer
                          else lars(self.params, opt.lr, opt.momentum, opt.weight_decay, opt.eta))
        self.scheduler = cosine(self.optimizer, self.total_steps, opt.warmup_steps, opt.final_lr_factor)
        self.augment = build_two_view(cfg, data)
        self.aug_gen = make_generator(derive_seed(ctx.seed, name, "augment"), ctx.device)

    def step(self) -> list[dict[str, Any]]:
        self.backbone.train()
        self.pretext.train()
        x = gather(self.data.pretext_x, self.sampler.next_batch(), self.device)
        views = self.augment(x, self.aug_gen)
        lr = current_lr(self.optimizer)
        loss = self.pretext.loss(self.backbone, *views)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        self.scheduler.step()
        self.pretext.update_target(self.backbone)  # BYOL EMA (SimCLR: no-op)
        self.step_idx += 1
        return [{"part": "pretext", "round": self.sampler.epoch + 1, "loss": loss.detach(),
                 "lr": lr, "grad_norm": grad_norm}]

    def state_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.state_dict(),
            "pretext": self.pretext.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.pretext.load_state_dict(state["pretext"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.aug_gen.set_state(state["aug_gen"])

    def result(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "pretext": self.pretext.state_dict()}

    def describe_step(self, step: int) -> str:
        return f"pretext step {step} of {self.total_steps}"
