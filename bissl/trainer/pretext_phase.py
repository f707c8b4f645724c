"""Pipeline step 1: self-supervised pretraining (SimCLR, BYOL or GPT) with LARS (or AdamW) and a cosine schedule.

On N ranks every rank draws the same global batch and trains on its shard; gradients are averaged
(plain data parallel, or a DeepSpeed engine under ZeRO 1-3), BatchNorm can use global-batch
statistics (``model.sync_bn``) and SimCLR's negatives come from all ranks
(``pretext.gather_negatives``), so the run optimises the single-process global-batch objective.

The same phase, started from a finished pretext result with the lower-level optimizer settings,
is the compute-matched continuation of the baseline (``baseline.compute_matched``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from bissl.config import Config, ConfigError
from bissl.distributed.objectives import LowerObjective
from bissl.distributed.trainable import OptimizerSpec, Trainable
from bissl.distributed.zero3 import full_state_dict
from bissl.trainer.bissl_stage import pretext_objective
from bissl.trainer.bissl_step import rank_mean
from bissl.trainer.builders import PipelineData, build_backbone_from, build_pretext_from, build_two_view, cosine, shard
from bissl.trainer.loop import Phase, RunContext
from bissl.trainer.rng import derive_seed, make_generator
from bissl.trainer.sampler import EpochSampler, gather


class PretextPhase(Phase):
    """Minimise the pretext loss ``L_P`` over the backbone and the pretext head.

    Args:
        name: phase name (``"pretext"``, or ``"pretext_matched"`` for the compute-matched baseline).
        cfg, data, ctx: experiment config, tensors, run context (``ctx.dp``: the ranks).
        total_steps: optimizer steps; ``None`` means ``pretext.epochs`` epochs.
        opt: optimizer settings; ``None`` means the ``pretext`` section's (``pretext.optimizer``,
            warm-up in epochs).
        warmup_steps: warm-up of the cosine schedule when ``opt`` is given.
        final_lr_factor: end of the cosine when ``opt`` is given.
        batch_size: global batch when ``opt`` is given.
        init: a previous pretext result to start from (``{"backbone", "pretext"}`` state dicts).
    """

    def __init__(
        self,
        name: str,
        cfg: Config,
        data: PipelineData,
        ctx: RunContext,
        *,
        total_steps: int | None = None,
        opt: OptimizerSpec | None = None,
        warmup_steps: int = 0,
        final_lr_factor: float = 0.0,
        batch_size: int | None = None,
        init: dict[str, Any] | None = None,
    ) -> None:
        p = cfg.pretext
        self.name = name
        self.cfg, self.data, self.device, self.dp = cfg, data, ctx.device, ctx.dp
        batch = batch_size if opt is not None and batch_size else p.batch_size
        self.sampler = EpochSampler(len(data.pretext_x), batch, derive_seed(ctx.seed, name, "order"))
        if self.sampler.batch_size % self.dp.world:
            raise ConfigError(
                f"the {name} batch is {self.sampler.batch_size} after capping at the "
                f"dataset size: not a multiple of run.nproc {self.dp.world}"
            )
        spe = self.sampler.steps_per_epoch
        if opt is None:
            opt = OptimizerSpec(p.optimizer, p.lr, p.momentum, p.weight_decay, p.eta, betas=(p.betas[0], p.betas[1]))
            warmup_steps, final_lr_factor = round(p.warmup_epochs * spe), p.final_lr_factor
        super().__init__(p.epochs * spe if total_steps is None else total_steps)
        backbone = build_backbone_from(cfg, data, ctx.device)
        pretext = build_pretext_from(cfg, backbone, ctx.device)
        if init is not None:
            backbone.load_state_dict(init["backbone"])
            pretext.load_state_dict(init["pretext"])
        total = self.total_steps
        self.model: Trainable = self.dp.trainable(
            LowerObjective(backbone, pretext, pretext_objective),
            opt,
            lambda o: cosine(o, total, warmup_steps, final_lr_factor),
        )
        self.augment = build_two_view(cfg, data)
        self.aug_gen = make_generator(derive_seed(ctx.seed, name, "augment"), ctx.device)

    def step(self) -> list[dict[str, Any]]:
        module = cast(LowerObjective, self.model.module)
        module.train()
        x = gather(self.data.pretext_x, self.sampler.next_batch(), self.device)
        views = shard(tuple(self.augment(x, self.aug_gen)), self.dp)
        lr = self.model.lr
        loss = self.model(views)
        self.model.backward(loss)
        grad_norm = self.model.step()
        module.update_target()  # BYOL's EMA (SimCLR, GPT: nothing)
        self.step_idx += 1
        (mean_loss,) = rank_mean(loss)
        return [
            {"part": "pretext", "round": self.sampler.epoch + 1, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm}
        ]

    def save_engines(self, directory: Path, tag: str) -> bool:
        if self.dp.zero_stage < 1:
            return False
        self.model.save(directory, tag)
        return True

    def load_engines(self, directory: Path, tag: str) -> None:
        self.model.load(directory, tag)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "sampler": self.sampler.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.sampler.load_state_dict(state["sampler"])
        self.aug_gen.set_state(state["aug_gen"])

    def result(self) -> dict[str, Any]:
        module = cast(LowerObjective, self.model.module)
        return {"backbone": full_state_dict(module.backbone), "pretext": full_state_dict(module.head)}

    def describe_step(self, step: int) -> str:
        return f"pretext step {step} of {self.total_steps}"
