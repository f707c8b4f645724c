"""A small BiSSL problem for the distributed tests and the ZeRO memory benchmark (one definition).

SimCLR (NT-Xent through a projector) below, linear classification above, any backbone; the data
are random images, drawn per step from a seed so every rank and the single-process oracle build
the same global batches, then cut into per-rank shards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bissl.distributed.objectives import LowerObjective, UpperObjective
from bissl.distributed.zero3 import gathered
from bissl.models import SmallCNN
from bissl.tasks.pretext.simclr import SimCLR


def simclr_objective(backbone: nn.Module, head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Pretext loss of a batch of two views ``(v1, v2)``, each ``(B, C, H, W)``; ``head`` is a
    :class:`SimCLR`."""
    v1, v2 = batch
    return cast(SimCLR, head).loss(backbone, v1, v2)


def classification_objective(backbone: nn.Module, head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of ``head(backbone(x))`` against ``y`` for a batch ``(x, y)``."""
    x, y = batch
    return F.cross_entropy(head(backbone(x)), y)


def bilevel_objectives(
    backbone: nn.Module,
    feat_dim: int,
    *,
    classes: int,
    proj_dims: Sequence[int],
    gamma: float,
    seed: int,
    **simclr: Any,
) -> tuple[LowerObjective, UpperObjective]:
    """θ = ``backbone`` with a SimCLR head (``simclr``: its extra options); φ = a copy of it with a
    linear head (BiSSL's start)."""
    torch.manual_seed(seed)
    pretext = SimCLR(feat_dim, proj_dims=tuple(proj_dims), **simclr)
    head = nn.Linear(feat_dim, classes)
    lower = LowerObjective(backbone, pretext, simclr_objective)
    upper = UpperObjective(copy.deepcopy(backbone), head, classification_objective, gamma=gamma)
    return lower, upper


def toy_objectives(
    *, seed: int = 0, width: int = 4, classes: int = 3, gamma: float = 1.0, **simclr: Any
) -> tuple[LowerObjective, UpperObjective]:
    """A :class:`~bissl.models.SmallCNN` (1 input channel, BatchNorm) BiSSL pair, a few thousand
    parameters per copy."""
    torch.manual_seed(seed)
    backbone = SmallCNN(1, width)
    return bilevel_objectives(
        backbone, backbone.out_dim, classes=classes, proj_dims=(8,), gamma=gamma, seed=seed + 1, **simclr
    )


@dataclass
class StepData:
    """Global batches of one BiSSL step, already cut into ``world`` shards each.

    Attributes:
        lower: per lower step, the list of shards ``[(v1, v2) of rank 0, ...]``.
        hvp: the shards of the HVP batch; upper: the shards of the downstream batch ``(x, y)``.
    """

    lower: list[list[tuple[Tensor, Tensor]]]
    hvp: list[tuple[Tensor, Tensor]]
    upper: list[tuple[Tensor, Tensor]]

    def for_rank(self, rank: int) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(lower_batches, hvp_batch, upper_batch)`` of one rank, as ``bissl_step`` takes them."""
        return [s[rank] for s in self.lower], self.hvp[rank], self.upper[rank]


def _shards(pair: tuple[Tensor, Tensor], world: int) -> list[tuple[Tensor, Tensor]]:
    n = pair[0].shape[0]
    if n % world:
        raise ValueError(f"a global batch of {n} does not split into {world} equal shards")
    return list(zip(pair[0].chunk(world), pair[1].chunk(world)))


def step_data(
    seed: int,
    step: int,
    *,
    world: int,
    lower_steps: int = 2,
    batch: int = 8,
    image: Sequence[int] = (1, 8, 8),
    classes: int = 3,
) -> StepData:
    """Random two-view pretext batches and labelled downstream batch for BiSSL step ``step``."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)

    def views() -> tuple[Tensor, Tensor]:
        x = torch.randn(batch, *image, generator=g)
        return x, x.flip(-1) + 0.1 * torch.randn(batch, *image, generator=g)

    lower = [_shards(views(), world) for _ in range(lower_steps)]
    hvp = _shards(views(), world)
    x = torch.randn(batch, *image, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return StepData(lower, hvp, _shards((x, y), world))


def sgd_factory(
    lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 1e-4
) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """``module -> SGD`` over its trainable parameters (elementwise, so valid for every ZeRO stage)."""

    def build(module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [p for p in module.parameters() if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay
        )

    return build


def decaying_lr(rate: float) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """``optimizer -> LambdaLR`` with factor ``1 / (1 + rate·step)`` (a schedule with state to resume)."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + rate * step))

    return build


def parameters_of(module: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of all parameters (ZeRO-3: gathered first)."""
    params = dict(module.named_parameters())
    with gathered(params.values()):
        return {k: p.detach().to("cpu").clone() for k, p in params.items()}
