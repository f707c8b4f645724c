"""Benchmark networks we did not tune for, as ``module:factory`` problem builders.

Each factory takes ``batch``, ``dtype`` and ``seed`` and returns a
:class:`bissl.testing.BilevelProblem` around an image backbone (32×32 RGB inputs): SimCLR's
NT-Xent over two views through a 2-layer projector (lower), cross-entropy through a linear head
(upper), exactly as :func:`bissl.testing.module_problem` builds them. They are what
``benchmarks/bench_hypergrad.py`` times and what ``bissl bench --model benchmarks.networks:<name>``
accepts. No BatchNorm anywhere: these are the networks whose HVPs go through convolutions,
matrix products, tanh/ReLU/SiLU/GELU, LayerNorm and softmax only.

* :func:`plain_cnn` — five 3×3 convolutions (48…384 channels, ~1.2 M parameters), tanh after the
  odd layers and ReLU after the even ones, global average pooling.
* :func:`mlp` — flattened images through 3072 → 1024 → 512 → 512 linear layers with SiLU
  (~3.8 M parameters).
* :func:`vit_tiny` — a ViT-Tiny-like transformer: 4×4 patches (64 tokens + a class token),
  width 192, 3 heads, MLP 768, GELU, pre-LayerNorm, 4 blocks (~1.8 M parameters).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from torch import Tensor

from bissl.testing import BilevelProblem, module_problem

IMAGE = (3, 32, 32)


class PlainCNN(nn.Module):
    """``(B, 3, H, W) -> (B, 384)``: conv-activation ×5 without normalisation, then the spatial mean."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width, 8 * width]
        strides = [1, 2, 2, 1, 2]
        layers: list[nn.Module] = []
        for i, (c_in, c_out, s) in enumerate(zip(chans[:-1], chans[1:], strides)):
            layers += [nn.Conv2d(c_in, c_out, 3, s, 1), nn.Tanh() if i % 2 == 0 else nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.out_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class MLP(nn.Module):
    """``(B, 3, 32, 32) -> (B, 512)``: flatten, then Linear-SiLU ×3."""

    def __init__(self, widths: tuple[int, ...] = (1024, 512, 512)) -> None:
        super().__init__()
        dims = [IMAGE[0] * IMAGE[1] * IMAGE[2], *widths]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block with explicit (matmul + softmax) attention."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))


class ViTTiny(nn.Module):
    """``(B, 3, 32, 32) -> (B, dim)``: patch embedding, class token, ``depth`` blocks, final LayerNorm."""

    def __init__(self, dim: int = 192, depth: int = 4, heads: int = 3, mlp: int = 768, patch: int = 4) -> None:
        super().__init__()
        tokens = (IMAGE[1] // patch) * (IMAGE[2] // patch)
        self.patch = nn.Conv2d(IMAGE[0], dim, patch, patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.ln(h[:, 0])


def _build(net_cls: type[nn.Module], batch: int, dtype: torch.dtype, seed: int) -> BilevelProblem:
    torch.manual_seed(seed)  # the backbone is built before module_problem seeds its data
    net = net_cls()
    return module_problem(net, feat=net.out_dim, batch=batch, image=IMAGE, dtype=dtype, seed=seed)


def plain_cnn(batch: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0) -> BilevelProblem:
    """:class:`PlainCNN` (width 48) problem."""
    return _build(PlainCNN, batch, dtype, seed)


def mlp(batch: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0) -> BilevelProblem:
    """:class:`MLP` problem."""
    return _build(MLP, batch, dtype, seed)


def vit_tiny(batch: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0) -> BilevelProblem:
    """:class:`ViTTiny` problem."""
    return _build(ViTTiny, batch, dtype, seed)
