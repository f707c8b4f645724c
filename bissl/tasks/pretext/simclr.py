"""SimCLR pretext task: projector + NT-Xent loss (Chen et al., 2020)."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bissl.tasks.pretext.heads import mlp_head

Encoder = Callable[[Tensor], Tensor]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """Normalised temperature-scaled cross entropy over the ``2B`` embeddings of two views.

    Each of the ``2B`` rows of ``[z1; z2]`` is a query whose positive is the other view of the same
    sample and whose ``2B - 2`` negatives are all other rows; similarities are cosines divided by
    ``temperature``. The loss is the mean over all ``2B`` queries (both directions).

    Args:
        z1, z2: ``(B, D)`` embeddings of view 1 and view 2 (row ``i`` of each: the same sample).
        temperature: ``tau > 0`` (BiSSL/SimCLR default 0.5).

    Returns:
        Scalar tensor. Identical views with orthonormal rows give
        ``log(e^{1/tau} + 2B - 2) - 1/tau``.

    Raises:
        ValueError: shapes differ, are not 2-D, ``B < 2``, or ``temperature <= 0``.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent: expected two (B, D) tensors of equal shape, got {tuple(z1.shape)} "
            f"and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"nt_xent: needs at least 2 samples for negatives, got B={z1.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be positive, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat((z1, z2), dim=0), dim=1)
    sim = (z @ z.T) / temperature  # (2B, 2B)
    # Drop each row's self-similarity instead of masking it with -inf: no infinities enter the
    # second-order derivatives taken by the HVPs. Row i keeps columns j != i, in order.
    off_diag = ~torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = sim[off_diag].view(2 * b, 2 * b - 1)
    rows = torch.arange(2 * b, device=z.device)
    positive = (rows + b) % (2 * b)
    # Removing column i shifts every later column one to the left.
    target = positive - (positive > rows).long()
    return F.cross_entropy(logits, target)


class SimCLR(nn.Module):
    """SimCLR head and loss; the backbone stays outside (the trainer passes ``encode``).

    Args:
        feat_dim: backbone output features.
        proj_dims: projector widths; ``(256, 256, 256)`` = Linear-BN-ReLU x2 + bias-free Linear.
        temperature: NT-Xent ``tau``.
    """

    def __init__(
        self, feat_dim: int, proj_dims: Sequence[int] = (256, 256, 256), temperature: float = 0.5
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SimCLR: temperature must be positive, got {temperature}")
        self.projector = mlp_head(feat_dim, proj_dims)
        self.temperature = float(temperature)

    def forward(self, h: Tensor) -> Tensor:
        """Project backbone features ``(B, feat_dim) -> (B, proj_dims[-1])``."""
        return self.projector(h)

    def loss(self, encode: Encoder, v1: Tensor, v2: Tensor) -> Tensor:
        """NT-Xent of the projected features of two views.

        Args:
            encode: images ``(2B, C, H, W)`` -> backbone features ``(2B, feat_dim)``; both views go
                through it in one call (one forward; BatchNorm sees both views' statistics).
            v1, v2: ``(B, C, H, W)`` augmented views of the same ``B`` images.
        """
        if v1.shape != v2.shape:
            raise ValueError(
                f"SimCLR.loss: views differ in shape: {tuple(v1.shape)} vs {tuple(v2.shape)}"
            )
        z = self.projector(encode(torch.cat((v1, v2), dim=0)))
        z1, z2 = z.split(v1.shape[0], dim=0)
        return nt_xent(z1, z2, self.temperature)

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable pretext-head parameters (the projector)."""
        return self.projector.parameters()

    def update_target(self, backbone_params=None, momentum: float | None = None) -> None:
        """No-op: SimCLR has no target network (kept so trainers treat pretexts uniformly)."""
        return None

    def reset_target(self, backbone=None) -> None:
        """No-op: SimCLR has no target network."""
        return None
