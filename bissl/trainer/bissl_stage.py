"""The BiSSL stage's schedule, start, data and optimizers (the phase is :mod:`bissl.trainer.bissl_phase`).

One place for what every run of the stage — one process or N ranks, plain torch or DeepSpeed —
must do identically:

* :class:`StageSchedule` — head warm-up steps, then ``stages`` × (lower steps, upper steps);
* :func:`start_models` — θ + ψ_P from the pretext result, φ a copy of θ with a new head ψ_D (built in
  a fixed order, so the head's random initialisation is the same in every implementation);
* :class:`StageBatches` — the *global* batches of the stage (data order, augmentation, the HVP batch
  of each stage) as a function of the seed and the position only; a data-parallel rank takes its
  shard of each global batch, so N ranks see exactly the samples one process would;
* the optimizers and LR schedules of the stage, the head warm-up loss and the two objectives
  (:func:`pretext_objective`, :func:`downstream_objective`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bissl.config import Config, ConfigError
from bissl.distributed.trainable import DataParallel, OptimizerSpec
from bissl.tasks.downstream import classification_loss
from bissl.trainer.builders import (
    PipelineData,
    build_backbone_from,
    build_downstream_augment,
    build_head_from,
    build_pretext_from,
    build_two_view,
    cosine,
    epochs_to_steps,
    shard,
)
from bissl.trainer.rng import derive_seed, make_generator
from bissl.trainer.sampler import EpochSampler, gather

#: Name of the phase; it salts every random stream of the stage.
PHASE = "bissl"


@dataclass(frozen=True)
class StageSchedule:
    """``warmup_steps`` head warm-up steps, then ``stages`` × (``lower_steps`` + ``upper_steps``)."""

    warmup_steps: int
    stages: int
    lower_steps: int
    upper_steps: int

    @classmethod
    def from_config(cls, cfg: Config, upper_steps_per_epoch: int) -> StageSchedule:
        b = cfg.bissl
        return cls(epochs_to_steps(b.head_warmup_epochs, upper_steps_per_epoch), b.stages, b.lower_steps, b.upper_steps)

    @property
    def cycle(self) -> int:
        return self.lower_steps + self.upper_steps

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.stages * self.cycle

    def locate(self, step: int) -> tuple[str, int, int]:
        """``(part, stage, k)`` of 0-based step ``step``: part in warmup/lower/upper, stage 0-based
        (-1 in warm-up), k the index within the warm-up or within the stage's lower/upper block."""
        if step < self.warmup_steps:
            return "warmup", -1, step
        stage, k = divmod(step - self.warmup_steps, self.cycle)
        return ("lower", stage, k) if k < self.lower_steps else ("upper", stage, k - self.lower_steps)

    def describe(self, step: int) -> str:
        """Human description of 1-based step ``step`` (for error messages)."""
        part, stage, k = self.locate(step - 1)
        if part == "warmup":
            return f"head warm-up step {k + 1} of {self.warmup_steps}"
        count = self.lower_steps if part == "lower" else self.upper_steps
        return f"{part} step {k + 1} of {count} in training stage {stage + 1} of {self.stages}"


@dataclass
class StageModels:
    """The two copies at the start of the stage: θ (``theta_net``) with ψ_P (``pretext``), and
    φ (``phi_net``) with ψ_D (``head``)."""

    theta_net: nn.Module
    pretext: nn.Module
    phi_net: nn.Module
    head: nn.Module

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        return {
            "theta_net": self.theta_net.state_dict(),
            "pretext": self.pretext.state_dict(),
            "phi_net": self.phi_net.state_dict(),
            "head": self.head.state_dict(),
        }

    def load_state_dicts(self, state: dict[str, dict[str, Any]]) -> None:
        for key in ("theta_net", "pretext", "phi_net", "head"):
            getattr(self, key).load_state_dict(state[key])


def start_models(cfg: Config, data: PipelineData, device: torch.device, pretext_result: dict[str, Any]) -> StageModels:
    """Lower model = the pretext result (BYOL: target re-initialised from the online network);
    upper model = a copy of the same backbone and a new downstream head.

    Construction order is part of the contract: the caller seeds the global RNG, and the head's
    initialisation is the fourth module drawn from it.
    """
    theta_net = build_backbone_from(cfg, data, device)
    theta_net.load_state_dict(pretext_result["backbone"])
    pretext = build_pretext_from(cfg, theta_net, device)
    pretext.load_state_dict(pretext_result["pretext"])
    task: Any = pretext  # SimCLR, BYOL or GPTPretext: each has reset_target
    task.reset_target(theta_net)  # BYOL: target := online (SimCLR: no-op)
    phi_net = build_backbone_from(cfg, data, device)
    phi_net.load_state_dict(pretext_result["backbone"])
    head = build_head_from(cfg, phi_net, data, device)
    return StageModels(theta_net, pretext, phi_net, head)


class StageBatches:
    """The global batches of the BiSSL stage.

    Lower steps draw pretext images from ``lower_sampler`` and augment them with ``lower_gen``;
    warm-up and upper steps draw downstream images from ``upper_sampler`` (augmented with
    ``upper_gen`` when ``finetune.augment`` is on); each stage's HVP batch is a function of
    ``(seed, stage)`` only, so a run resumed in the middle of a stage's upper steps redraws it.

    Every rank draws the same global batches and keeps its shard (:func:`bissl.trainer.builders.shard`).

    Args:
        cfg, data: experiment config and tensors.
        seed: the training seed.
        device: where batches go.
        dp: the data-parallel layout (default: one process).
    """

    def __init__(
        self, cfg: Config, data: PipelineData, seed: int, device: torch.device, dp: DataParallel | None = None
    ) -> None:
        b = cfg.bissl
        self.data, self.seed, self.device = data, seed, device
        self.dp = dp or DataParallel()
        self.lower_sampler = EpochSampler(
            len(data.pretext_x), b.lower.batch_size, derive_seed(seed, PHASE, "lower_order")
        )
        self.upper_sampler = EpochSampler(
            len(data.train_x), b.upper.batch_size, derive_seed(seed, PHASE, "upper_order")
        )
        self.two_view = build_two_view(cfg, data)
        self.down_aug = build_downstream_augment(cfg, data)
        self.lower_gen = make_generator(derive_seed(seed, PHASE, "lower_augment"), device)
        self.upper_gen = make_generator(derive_seed(seed, PHASE, "upper_augment"), device)
        self.hvp_batch_size = min(b.hvp_batch_size or b.lower.batch_size, len(data.pretext_x))
        self._hvp: tuple[int, tuple[Tensor, ...]] | None = None

    def check_shards(self) -> None:
        """The global batch sizes (after the samplers' cap at the data size) must split evenly."""
        b = self.dp.world
        for what, size in (
            ("bissl.upper.batch_size", self.upper_sampler.batch_size),
            ("bissl.lower.batch_size", self.lower_sampler.batch_size),
            ("bissl.hvp_batch_size (default: bissl.lower.batch_size)", self.hvp_batch_size),
        ):
            if size % b or (what != "bissl.upper.batch_size" and size // b < 2):
                raise ConfigError(
                    f"'{what}' is {size} after capping at the dataset size: it must be "
                    f"a multiple of run.nproc {b} with at least 2 samples per rank"
                )

    def downstream(self) -> tuple[Tensor, Tensor]:
        """This rank's shard of the next warm-up/upper batch ``(x, y)``: ``(b, C, H, W)``, ``(b,)``."""
        idx = self.upper_sampler.next_batch()
        x, y = gather(self.data.train_x, idx, self.device), gather(self.data.train_y, idx, self.device)
        if self.down_aug is not None:
            x = self.down_aug(x, self.upper_gen)
        x_shard, y_shard = shard((x, y), self.dp)
        return x_shard, y_shard

    def lower_views(self) -> tuple[Tensor, ...]:
        """This rank's shard of the next lower-step batch: the pretext augmentation's views."""
        x = gather(self.data.pretext_x, self.lower_sampler.next_batch(), self.device)
        return shard(tuple(self.two_view(x, self.lower_gen)), self.dp)

    def hvp_views(self, stage: int) -> tuple[Tensor, ...]:
        """This rank's shard of the views of stage ``stage``'s HVP batch (cached for the stage)."""
        if self._hvp is None or self._hvp[0] != stage:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, PHASE, "hvp_batch", stage))
            idx = torch.randperm(len(self.data.pretext_x), generator=gen)[: self.hvp_batch_size]
            x = gather(self.data.pretext_x, idx, self.device)
            aug_gen = make_generator(derive_seed(self.seed, PHASE, "hvp_augment", stage), self.device)
            self._hvp = (stage, shard(tuple(self.two_view(x, aug_gen)), self.dp))
        return self._hvp[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "lower_sampler": self.lower_sampler.state_dict(),
            "upper_sampler": self.upper_sampler.state_dict(),
            "lower_gen": self.lower_gen.get_state(),
            "upper_gen": self.upper_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lower_sampler.load_state_dict(state["lower_sampler"])
        self.upper_sampler.load_state_dict(state["upper_sampler"])
        self.lower_gen.set_state(state["lower_gen"])
        self.upper_gen.set_state(state["upper_gen"])
        self._hvp = None


# --------------------------------------------------------------------------- optimizers
Schedule = Callable[[torch.optim.Optimizer], Any]


def warmup_spec(cfg: Config) -> OptimizerSpec:
    """Head warm-up: SGD on ψ_D at the upper lr/wd (no clipping)."""
    up = cfg.bissl.upper
    return OptimizerSpec("sgd", up.lr, up.momentum, up.weight_decay)


def warmup_schedule(cfg: Config, warmup_steps: int) -> Schedule:
    """Cosine over the warm-up."""
    return lambda opt: cosine(opt, warmup_steps, 0, cfg.bissl.upper.final_lr_factor)


def lower_spec(cfg: Config) -> OptimizerSpec:
    """``bissl.lower.optimizer`` (LARS, the reference, or SGD with momentum) on (θ, ψ_P), clipped."""
    b, lo = cfg.bissl, cfg.bissl.lower
    return OptimizerSpec(lo.optimizer, lo.lr, lo.momentum, lo.weight_decay, lo.eta, clip_norm=b.clip_norm)


def lower_schedule(cfg: Config) -> Schedule:
    """Cosine over ``stages × lower_steps`` steps with ``lower.warmup_steps`` warm-up."""
    b = cfg.bissl
    return lambda opt: cosine(opt, b.stages * b.lower_steps, b.lower.warmup_steps, b.lower.final_lr_factor)


def upper_spec(cfg: Config) -> OptimizerSpec:
    """SGD with momentum on (φ, ψ_D), clipped."""
    b, up = cfg.bissl, cfg.bissl.upper
    return OptimizerSpec("sgd", up.lr, up.momentum, up.weight_decay, clip_norm=b.clip_norm)


def upper_schedule(cfg: Config) -> Schedule:
    """Cosine over ``stages × upper_steps`` steps, no warm-up."""
    b = cfg.bissl
    return lambda opt: cosine(opt, b.stages * b.upper_steps, 0, b.upper.final_lr_factor)


# --------------------------------------------------------------------------- losses and rows
def warmup_loss(phi_net: nn.Module, head: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Head warm-up loss: φ frozen in eval mode (its BatchNorm statistics do not move), ψ_D trains."""
    phi_net.eval()
    head.train()
    with torch.no_grad():
        feats = phi_net(x)
    return classification_loss(head(feats), y)


def pretext_objective(backbone: nn.Module, pretext: nn.Module, views: tuple[Tensor, ...]) -> Tensor:
    """``L_P`` of one batch of views (the lower objective's loss without the proximal term)."""
    task: Any = pretext  # SimCLR, BYOL or GPTPretext: each has loss(encode, *views)
    return task.loss(backbone, *views)


def downstream_objective(backbone: nn.Module, head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``L_D``: cross-entropy of ``head(backbone(x))`` against ``y``."""
    x, y = batch
    return classification_loss(head(backbone(x)), y)
