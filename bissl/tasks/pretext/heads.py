"""MLP heads shared by the pretext tasks (projector; BYOL's predictor)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp_head(in_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """``Linear-BN-ReLU`` for each of ``dims[:-1]``, then a bias-free ``Linear`` to ``dims[-1]``.

    With ``dims=(256, 256, 256)`` this is the SimCLR/BYOL projector of the BiSSL reference. The
    hidden Linear layers carry no bias either: the BatchNorm right after them has its own shift.

    Shapes:
        ``(B, in_dim) -> (B, dims[-1])``; training mode needs ``B >= 2`` (BatchNorm1d).
    """
    dims = tuple(int(d) for d in dims)
    if in_dim <= 0 or not dims or min(dims) <= 0:
        raise ValueError(f"mlp_head: need in_dim > 0 and positive dims, got {in_dim}, {dims}")
    layers: list[nn.Module] = []
    prev = in_dim
    for width in dims[:-1]:
        layers += [nn.Linear(prev, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, dims[-1], bias=False))
    return nn.Sequential(*layers)
