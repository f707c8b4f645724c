"""Small bilevel problems shared by the tests and the benchmarks (one definition, two users).

Each builder returns a :class:`BilevelProblem`: a lower (pretext-like) loss and an upper
(downstream-like) loss of the same backbone parameter dict, with live modules (a projector, a head)
captured by the closures, as in BiSSL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bissl.typing import LossFn, Params


@dataclass
class BilevelProblem:
    """A lower loss, an upper loss and the backbone point they share.

    Attributes:
        backbone: the module whose parameters form ``params``.
        params: ``{name: Tensor}`` detached copy of the backbone parameters.
        lower_loss: ``L_P(θ)``, contrastive (NT-Xent) on two views through a projector.
        upper_loss: ``L_D(θ)``, cross-entropy through a linear head.
        modules: the captured trainable modules (projector, head).
    """

    backbone: nn.Module
    params: Params
    lower_loss: LossFn
    upper_loss: LossFn
    modules: dict[str, nn.Module]


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent over ``2B`` samples (both directions). ``z1, z2``: ``(B, D)``."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _problem(backbone: nn.Module, feat: int, x1: Tensor, x2: Tensor, y: Tensor, classes: int,
             proj_dim: int, dtype: torch.dtype) -> BilevelProblem:
    backbone = backbone.to(dtype)
    projector = nn.Sequential(nn.Linear(feat, proj_dim), nn.ReLU(), nn.Linear(proj_dim, proj_dim)).to(dtype)
    head = nn.Linear(feat, classes).to(dtype)
    buffers = dict(backbone.named_buffers())

    def encode(params: Params, x: Tensor) -> Tensor:
        return functional_call(backbone, {**params, **buffers}, (x,))

    def lower_loss(params: Params) -> Tensor:
        return nt_xent_loss(projector(encode(params, x1)), projector(encode(params, x2)))

    def upper_loss(params: Params) -> Tensor:
        return F.cross_entropy(head(encode(params, x1)), y)

    params = {k: p.detach().clone() for k, p in backbone.named_parameters()}
    return BilevelProblem(backbone, params, lower_loss, upper_loss, {"projector": projector, "head": head})


def mlp_problem(*, batch: int = 8, dim: int = 5, hidden: int = 6, dtype: torch.dtype = torch.float64,
                seed: int = 0) -> BilevelProblem:
    """A tiny tanh MLP backbone (a few dozen parameters): dense Hessians are cheap."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
    x = torch.randn(batch, dim, generator=g, dtype=dtype)
    x2 = x + 0.1 * torch.randn(batch, dim, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (batch,), generator=g)
    return _problem(backbone, hidden, x, x2, y, 3, 4, dtype)


class SmallConvNet(nn.Module):
    """conv-BN-ReLU ×2 + global average pool: exercises conv double backward and BatchNorm."""

    def __init__(self, channels: int = 1, width: int = 4, norm: str = "batch"):
        super().__init__()
        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(1, c)
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), norm_layer(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), norm_layer(2 * width), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 2 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def cnn_problem(*, batch: int = 6, size: int = 6, width: int = 3, norm: str = "batch",
                dtype: torch.dtype = torch.float64, seed: int = 0) -> BilevelProblem:
    """A tiny conv net with BatchNorm (train mode) on ``size×size`` images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = SmallConvNet(1, width, norm)
    x = torch.randn(batch, 1, size, size, generator=g, dtype=dtype)
    x2 = x.flip(-1) + 0.1 * torch.randn(batch, 1, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (batch,), generator=g)
    return _problem(backbone, backbone.out_dim, x, x2, y, 3, 4, dtype)


def module_problem(backbone: nn.Module, *, feat: int, batch: int, image: tuple[int, ...],
                   classes: int = 10, proj_dim: int = 128, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> BilevelProblem:
    """A problem around any image backbone (e.g. a ResNet-18 for benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(batch, *image, generator=g, dtype=dtype)
    x2 = x.flip(-1) + 0.1 * torch.randn(batch, *image, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=g)
    return _problem(backbone, feat, x, x2, y, classes, proj_dim, dtype)


def dense_hessian(loss_fn: LossFn, params: Params) -> Tensor:
    """``(P, P)`` Hessian of ``loss_fn`` at ``params`` in dict order (tiny models only).

    Built column by column with ``torch.autograd.functional.hessian`` (no vmap): on torch 2.13,
    ``torch.func.hessian``/``jacrev(jacrev)`` return a wrong, asymmetric Hessian through train-mode
    ``batch_norm`` (measured: 3–24% relative error on :func:`cnn_problem`), so they are no oracle.
    """
    from bissl.ops.batchnorm import batchnorm_stats_frozen
    from bissl.ops.flat import flat_spec, flatten, unflatten

    spec = flat_spec(params)

    def flat_loss(theta: Tensor) -> Tensor:
        return loss_fn(unflatten(theta, spec))

    with batchnorm_stats_frozen():
        return torch.autograd.functional.hessian(flat_loss, flatten(params).detach(), vectorize=False)
