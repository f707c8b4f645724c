"""Pipeline step 3: fine-tuning a backbone with a fresh head, for both arms of the comparison.

``finetune.mode: linear_probe`` freezes the backbone (no gradient, BatchNorm in eval mode: its
running statistics stay those of the arm's backbone) and trains the head only.

Both arms (BiSSL: the lower backbone θ; baseline: the pretext backbone) use the identical protocol
and the identical random streams (head initialisation, data order, augmentation) derived from the
seed only, so the comparison is paired: the backbone is the only difference. Validation accuracy is
logged during training; the test split is evaluated once, after the last epoch (no model selection
on test). On N ranks each trains on its shard of every global batch and evaluates its contiguous
share of the evaluation sets; per-example losses and predictions are gathered in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import functional_call

from bissl.config import Config, ConfigError
from bissl.distributed.collectives import gather_objects
from bissl.distributed.objectives import UpperObjective
from bissl.distributed.trainable import OptimizerSpec, Trainable
from bissl.distributed.zero3 import full_state_dict
from bissl.tasks.downstream import eval_mode, predict
from bissl.trainer.bissl_stage import downstream_objective
from bissl.trainer.bissl_step import rank_mean
from bissl.trainer.builders import (
    PipelineData,
    build_backbone_from,
    build_downstream_augment,
    build_head_from,
    cosine,
    shard,
)
from bissl.trainer.loop import Phase, RunContext
from bissl.trainer.rng import derive_seed, make_generator
from bissl.trainer.sampler import EpochSampler, gather


class FinetunePhase(Phase):
    """SGD (momentum) or AdamW, cosine, on backbone + fresh head (or the head alone, for a linear
    probe) for ``finetune.epochs`` epochs.

    Args:
        name: ``"finetune_bissl"`` or ``"finetune_baseline"``.
        cfg, data, ctx: experiment config, tensors, run context (``ctx.dp``: the ranks).
        backbone_state: the backbone to start from (a ``state_dict``).
    """

    def __init__(
        self, name: str, cfg: Config, data: PipelineData, ctx: RunContext, backbone_state: dict[str, Any]
    ) -> None:
        f = cfg.finetune
        self.name = name
        self.cfg, self.data, self.device, self.dp = cfg, data, ctx.device, ctx.dp
        self.sampler = EpochSampler(len(data.train_x), f.batch_size, derive_seed(ctx.seed, "finetune", "order"))
        if self.sampler.batch_size % self.dp.world:
            raise ConfigError(
                f"the fine-tuning batch is {self.sampler.batch_size} after capping at "
                f"the dataset size: not a multiple of run.nproc {self.dp.world}"
            )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        super().__init__(f.epochs * self.steps_per_epoch)
        backbone = build_backbone_from(cfg, data, ctx.device)
        backbone.load_state_dict(backbone_state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.seed, "finetune", "head"))  # same head for both arms
            head = build_head_from(cfg, backbone, data, ctx.device)
        self.probe = f.mode == "linear_probe"
        if self.probe:
            backbone.requires_grad_(False)  # the trainable takes the parameters that require grad
        total = self.total_steps
        self.model: Trainable = self.dp.trainable(
            UpperObjective(backbone, head, downstream_objective),
            OptimizerSpec(f.optimizer, f.lr, f.momentum, f.weight_decay, betas=(f.betas[0], f.betas[1])),
            lambda o: cosine(o, total, 0, f.final_lr_factor),
        )
        self.augment = build_downstream_augment(cfg, data)
        self.aug_gen = make_generator(derive_seed(ctx.seed, "finetune", "augment"), ctx.device)

    def _train_mode(self) -> None:
        module = cast(UpperObjective, self.model.module)
        module.train()
        if self.probe:
            module.backbone.eval()  # the arm's BatchNorm statistics are part of what is probed

    def step(self) -> list[dict[str, Any]]:
        self._train_mode()
        idx = self.sampler.next_batch()
        x, y = gather(self.data.train_x, idx, self.device), gather(self.data.train_y, idx, self.device)
        if self.augment is not None:
            x = self.augment(x, self.aug_gen)
        batch = shard((x, y), self.dp)
        lr = self.model.lr
        loss = self.model(batch)
        self.model.backward(loss)
        self.model.step()
        self.step_idx += 1
        epoch = self.sampler.epoch + 1
        (mean_loss,) = rank_mean(loss)
        rows: list[dict[str, Any]] = [{"part": "train", "round": epoch, "loss": mean_loss, "lr": lr}]
        if self.step_idx % self.steps_per_epoch == 0 and (
            epoch % self.cfg.finetune.eval_every_epochs == 0 or self.step_idx == self.total_steps
        ):
            ev = self.evaluate(self.data.val_x, self.data.val_y)
            rows.append(
                {"part": "eval", "round": epoch, "val_loss": ev["loss"], "val_acc": ev["acc"], "always_log": True}
            )
        return rows

    def _predict(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example losses and predictions over ``(x, y)``, each rank computing its contiguous
        share (gathered under ZeRO-3) and all ranks receiving the whole, in order."""
        share = torch.tensor_split(torch.arange(len(y)), self.dp.world)[self.dp.rank]
        batch_size = max(256, self.cfg.finetune.batch_size)
        with self.model.full_state() as state:
            fm = cast(UpperObjective, self.model.functional)
            parts = {
                p: {k.removeprefix(f"{p}."): v for k, v in state.items() if k.startswith(f"{p}.")}
                for p in ("backbone", "head")
            }
            with eval_mode(fm):
                loss, pred = predict(
                    lambda xb: functional_call(fm.backbone, parts["backbone"], (xb,)),
                    lambda h: functional_call(fm.head, parts["head"], (h,)),
                    x[share],
                    y[share],
                    batch_size,
                    device=self.device,
                )
        pieces = gather_objects((loss, pred))
        return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])

    def evaluate(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """``{"loss", "acc", "pred"}`` on ``(x, y)`` (identical on every rank)."""
        loss, pred = self._predict(x, y)
        return {"loss": float(loss.mean()), "acc": float((pred == y.cpu()).double().mean()), "pred": pred}

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
        val = self.evaluate(self.data.val_x, self.data.val_y)
        test = self.evaluate(self.data.test_x, self.data.test_y)
        module = cast(UpperObjective, self.model.module)
        return {
            "val_acc": val["acc"],
            "val_loss": val["loss"],
            "test_acc": test["acc"],
            "test_loss": test["loss"],
            "test_pred": test["pred"],
            "test_correct": (test["pred"] == self.data.test_y.cpu()).to(torch.int64),
            "backbone": full_state_dict(module.backbone),
            "head": full_state_dict(module.head),
        }

    def describe_step(self, step: int) -> str:
        epoch = (step - 1) // self.steps_per_epoch + 1
        return f"fine-tuning step {step} of {self.total_steps} (epoch {epoch})"
