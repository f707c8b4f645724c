"""SimCLR pretext task: projector + NT-Xent loss (Chen et al., 2020)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bissl.distributed.autograd import all_gather_cat
from bissl.distributed.collectives import ProcessGroup, rank, world_size
from bissl.tasks.pretext.heads import mlp_head

Encoder = Callable[[Tensor], Tensor]


def _check_temperature(temperature: float, where: str) -> None:
    if temperature <= 0:
        raise ValueError(f"{where}: temperature must be positive, got {temperature}")


def _nt_xent_of_rows(queries: Tensor, keys: Tensor, query_rows: Tensor, temperature: float) -> Tensor:
    """Mean NT-Xent of some rows of the ``2B`` embeddings ``keys = [view 1; view 2]``.

    Query ``i`` is row ``query_rows[i]`` of ``keys``; its positive is the other view of the same
    sample (row ``(query_rows[i] + B) mod 2B``) and its negatives are the other ``2B - 2`` rows.

    Args:
        queries: ``(q, D)`` L2-normalised rows (equal to ``keys[query_rows]``).
        keys: ``(2B, D)`` L2-normalised embeddings of both views, view 1 first.
        query_rows: ``(q,)`` int64 row indices of the queries in ``keys``.
        temperature: ``tau > 0``.
    """
    two_b = keys.shape[0]
    sim = (queries @ keys.T) / temperature  # (q, 2B)
    # Drop each query's self-similarity instead of masking it with -inf: no infinities enter the
    # second-order derivatives taken by the HVPs. Query i keeps columns j != query_rows[i], in order.
    keep = torch.ones(sim.shape, dtype=torch.bool, device=sim.device)
    keep[torch.arange(sim.shape[0], device=sim.device), query_rows] = False
    logits = sim[keep].view(sim.shape[0], two_b - 1)
    positive = (query_rows + two_b // 2) % two_b
    # Removing column query_rows[i] shifts every later column one to the left.
    target = positive - (positive > query_rows).long()
    return F.cross_entropy(logits, target)


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
            f"nt_xent: expected two (B, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"nt_xent: needs at least 2 samples for negatives, got B={z1.shape[0]}")
    _check_temperature(temperature, "nt_xent")
    z = F.normalize(torch.cat((z1, z2), dim=0), dim=1)
    return _nt_xent_of_rows(z, z, torch.arange(z.shape[0], device=z.device), temperature)


def nt_xent_across_ranks(z1: Tensor, z2: Tensor, temperature: float = 0.5, group: ProcessGroup | None = None) -> Tensor:
    """This rank's part of the NT-Xent of the global batch, negatives gathered from every rank.

    Rank ``r`` of ``N`` holds rows ``[r·b, (r+1)·b)`` of each view of the global batch
    ``[view 1; view 2]`` (``B = N·b`` samples). The embeddings of all ranks are gathered with
    :func:`~bissl.distributed.autograd.all_gather_cat` (gradients flow back through the gather to
    the rank that computed them) and this rank's ``2b`` queries, its rows of view 1 and of view 2,
    are scored against all ``2B`` rows. The **mean over ranks** of the returned losses is
    :func:`nt_xent` of the global batch, and averaging the ranks' gradients (data-parallel
    training) gives its gradient; HVPs likewise (the gather is twice differentiable).

    Args:
        z1, z2: ``(b, D)`` this rank's embeddings of view 1 and view 2; the same ``b`` and ``D``
            on every rank.
        temperature: ``tau > 0``.
        group: process group (default: the world).

    Returns:
        Scalar tensor: the mean over this rank's ``2b`` queries. With one process it is
        ``nt_xent(z1, z2, temperature)`` (bit-identical; nothing is gathered).

    Raises:
        ValueError: shapes differ or are not 2-D, the global ``B < 2``, ``temperature <= 0``, or
            the ranks' shapes differ (raised on every rank).

    Every rank must call it the same number of times, in the same order. Each call issues two
    all-gathers (the shape check of :func:`~bissl.distributed.autograd.all_gather_cat`, which
    reads its small result on the host, then the embeddings); its backward one all-reduce.
    """
    n = world_size(group)
    if n == 1:
        return nt_xent(z1, z2, temperature)
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent_across_ranks: expected two (b, D) tensors of equal shape, got "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    _check_temperature(temperature, "nt_xent_across_ranks")
    b = z1.shape[0]
    if n * b < 2:
        raise ValueError(f"nt_xent_across_ranks: needs at least 2 samples in the global batch, got {n * b}")
    local = F.normalize(torch.cat((z1, z2), dim=0), dim=1)  # (2b, D): [view 1; view 2] of this rank
    # Gathered rows are [v1 of rank 0; v2 of rank 0; v1 of rank 1; ...]; put view 1 of all ranks first.
    keys = all_gather_cat(local, 0, group).view(n, 2, b, -1).transpose(0, 1).reshape(2 * n * b, -1)
    own = torch.arange(b, device=local.device) + rank(group) * b
    query_rows = torch.cat((own, own + n * b))
    return _nt_xent_of_rows(local, keys, query_rows, temperature)


class SimCLR(nn.Module):
    """SimCLR head and loss; the backbone stays outside (the trainer passes ``encode``).

    Args:
        feat_dim: backbone output features.
        proj_dims: projector widths; ``(256, 256, 256)`` = Linear-BN-ReLU x2 + bias-free Linear.
        temperature: NT-Xent ``tau``.
        gather_negatives: with more than one rank in ``process_group``, score this rank's views
            against the embeddings of every rank (:func:`nt_xent_across_ranks`, as data-parallel
            SimCLR does: the rank-mean of the losses is the global batch's NT-Xent) instead of its
            own shard only. No effect with one process. Off by default: with it on, evaluating
            several shards' losses one after another inside one rank (a shard-averaged oracle)
            would gather from the other ranks at every call.
        process_group: the ranks whose embeddings are gathered (default: the world).
    """

    def __init__(
        self,
        feat_dim: int,
        proj_dims: Sequence[int] = (256, 256, 256),
        temperature: float = 0.5,
        gather_negatives: bool = False,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        _check_temperature(temperature, "SimCLR")
        self.projector = mlp_head(feat_dim, proj_dims)
        self.temperature = float(temperature)
        self.gather_negatives = bool(gather_negatives)
        self.process_group = process_group

    def forward(self, h: Tensor) -> Tensor:
        """Project backbone features ``(B, feat_dim) -> (B, proj_dims[-1])``."""
        return self.projector(h)

    def loss(self, encode: Encoder, v1: Tensor, v2: Tensor) -> Tensor:
        """NT-Xent of the projected features of two views.

        Args:
            encode: images ``(2B, C, H, W)`` -> backbone features ``(2B, feat_dim)``; both views go
                through it in one call (one forward; BatchNorm sees both views' statistics).
            v1, v2: ``(B, C, H, W)`` augmented views of the same ``B`` images (with several ranks
                and ``gather_negatives``: this rank's shard of the global batch, same ``B`` on every
                rank; the loss is then this rank's part, see :func:`nt_xent_across_ranks`).
        """
        if v1.shape != v2.shape:
            raise ValueError(f"SimCLR.loss: views differ in shape: {tuple(v1.shape)} vs {tuple(v2.shape)}")
        z = self.projector(encode(torch.cat((v1, v2), dim=0)))
        z1, z2 = z.split(v1.shape[0], dim=0)
        if self.gather_negatives:
            return nt_xent_across_ranks(z1, z2, self.temperature, self.process_group)
        return nt_xent(z1, z2, self.temperature)

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable pretext-head parameters (the projector)."""
        return self.projector.parameters()

    def update_target(self, backbone_params=None, momentum: float | None = None) -> None:
        """No-op: SimCLR has no target network (kept so trainers treat pretexts uniformly)."""
        return

    def reset_target(self, backbone=None) -> None:
        """No-op: SimCLR has no target network."""
        return
