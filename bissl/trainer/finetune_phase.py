"""Pipeline step 3: fine-tuning a backbone with a fresh head, for both arms of the comparison.

``finetune.mode: linear_probe`` freezes the backbone (no gradient, BatchNorm in eval mode: its
running statistics stay those of the arm's backbone) and trains the head only.

Both arms (BiSSL: the lower backbone θ; baseline: the pretext backbone) use the identical protocol
and the identical random streams (head initialisation, data order, augmentation) derived from the
seed only, so the comparison is paired: the backbone is the only difference. Validation accuracy is
logged during training; the test split is evaluated once, after the last epoch (no model selection
on test).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from bissl.config import Config
from bissl.tasks.downstream import build_head, classification_loss, evaluate
from bissl.trainer.builders import (
    PipelineData, build_backbone_from, build_downstream_augment, cosine, current_lr,
    finetune_optimizer,
)
from bissl.trainer.loop import Phase, RunContext
from bissl.trainer.rng import derive_seed, make_generator
from bissl.trainer.sampler import EpochSampler, gather


class FinetunePhase(Phase):
    """SGD (momentum) or AdamW, cosine, on backbone + fresh head (or the head alone, for a linear
    probe) for ``finetune.epochs`` epochs.

    Args:
        name: ``"finetune_bissl"`` or ``"finetune_baseline"``.
        cfg, data, ctx: experiment config, tensors, run context.
        backbone_state: the backbone to start from (a ``state_dict``).
    """

    def __init__(self, name: str, cfg: Config, data: PipelineData, ctx: RunContext,
                 backbone_state: dict[str, Any]) -> None:
        f = cfg.finetune
        self.name = name
        self.cfg, self.data, self.device = cfg, data, ctx.device
        self.sampler = EpochSampler(len(data.train_x), f.batch_size,
                                    derive_seed(ctx.seed, "finetune", "order"))
        self.steps_per_epoch = self.sampler.steps_per_epoch
        super().__init__(f.epochs * self.steps_per_epoch)
        self.backbone = build_backbone_from(cfg, data, ctx.device)
        self.backbone.load_state_dict(backbone_state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.seed, "finetune", "head"))  # same head for both arms
            self.head = build_head(self.backbone.out_dim, data.num_classes, f.head).to(ctx.device)
        self.probe = f.mode == "linear_probe"
        if self.probe:
            self.backbone.requires_grad_(False)
        backbone_params = [] if self.probe else list(self.backbone.parameters())
        self.params = backbone_params + list(self.head.parameters())
        self.optimizer = finetune_optimizer(cfg, self.params)
        self.scheduler = cosine(self.optimizer, self.total_steps, 0, f.final_lr_factor)
        self.augment = build_downstream_augment(cfg, data)
        self.aug_gen = make_generator(derive_seed(ctx.seed, "finetune", "augment"), ctx.device)
        self.val = TensorDataset(data.val_x, data.val_y)
        self.test = TensorDataset(data.test_x, data.test_y)

    def step(self) -> list[dict[str, Any]]:
        self.backbone.train(not self.probe)
        self.head.train()
        idx = self.sampler.next_batch()
        x, y = gather(self.data.train_x, idx, self.device), gather(self.data.train_y, idx, self.device)
        if self.augment is not None:
            x = self.augment(x, self.aug_gen)
        lr = current_lr(self.optimizer)
        with torch.set_grad_enabled(not self.probe):
            features = self.backbone(x)
        loss = classification_loss(self.head(features), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step_idx += 1
        epoch = self.sampler.epoch + 1
        rows: list[dict[str, Any]] = [{"part": "train", "round": epoch, "loss": loss.detach(), "lr": lr}]
        if self.step_idx % self.steps_per_epoch == 0 and (
                epoch % self.cfg.finetune.eval_every_epochs == 0 or self.step_idx == self.total_steps):
            ev = self.evaluate(self.val)
            rows.append({"part": "eval", "round": epoch, "val_loss": ev["loss"], "val_acc": ev["acc"],
                         "always_log": True})
        return rows

    def evaluate(self, dataset: TensorDataset) -> dict[str, float]:
        return evaluate(self.backbone, self.head, dataset, batch_size=max(256, self.cfg.finetune.batch_size))

    def state_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("backbone", "head", "optimizer", "scheduler", "sampler"):
            getattr(self, key).load_state_dict(state[key])
        self.aug_gen.set_state(state["aug_gen"])

    def result(self) -> dict[str, Any]:
        val, test = self.evaluate(self.val), self.evaluate(self.test)
        return {"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
                "test_loss": test["loss"], "backbone": self.backbone.state_dict(),
                "head": self.head.state_dict()}

    def describe_step(self, step: int) -> str:
        epoch = (step - 1) // self.steps_per_epoch + 1
        return f"fine-tuning step {step} of {self.total_steps} (epoch {epoch})"
