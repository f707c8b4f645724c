"""BatchNorm over the global batch of all ranks, on CPU (gloo) and GPU alike.

``torch.nn.SyncBatchNorm`` refuses CPU tensors and its backward is first-order only. Our
:class:`SyncBatchNorm` computes the global statistics with the differentiable collectives of
:mod:`bissl.distributed.autograd`, so its gradient, its second derivatives (the HVPs' double
backward) and its forward-mode derivative are those of BatchNorm on the concatenated global batch.

How the statistics are combined: each rank computes its count ``n_r``, per-channel mean ``m_r`` and
sum of squared deviations ``M2_r`` (two passes over its shard, as BatchNorm does); one
:func:`~bissl.distributed.autograd.all_gather_cat` of ``[m_r, M2_r, n_r]`` (``2C + 1`` numbers
per rank) brings every rank's triple, and the pairwise-update formula
``mean = Σ n_r m_r / n``, ``M2 = Σ M2_r + Σ n_r (m_r − mean)²`` gives the global ones, with
``n = Σ n_r``. Unlike summing ``x`` and ``x²`` it does not cancel catastrophically in float32
when the mean is large against the spread, and shards of different sizes combine exactly.

Semantics (``process_group`` of size ``N``):

* train mode, ``N > 1``: normalise with the global batch mean and biased variance; when tracking,
  update ``running_mean``, ``running_var`` (unbiased, ``M2 / (n − 1)``) and
  ``num_batches_tracked`` as ``nn.BatchNorm`` would on the global batch (``momentum=None``: the
  cumulative average). The update is skipped under the HVP BatchNorm policy
  (:func:`bissl.ops.batchnorm.batchnorm_stats_frozen`, which every HVP applies);
* eval mode, or ``N == 1``: ``nn.BatchNorm``'s own forward (``F.batch_norm``), bit-identical. As in
  ``torch.nn.SyncBatchNorm``, an eval-mode layer without running statistics normalises with its
  own shard's statistics.

Every rank must run the same train-mode SyncBatchNorm layers in the same order (each issues one
collective in the forward pass and one in the backward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bissl.distributed.autograd import all_gather_cat
from bissl.distributed.collectives import ProcessGroup, world_size
from bissl.ops.batchnorm import stats_frozen

_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm with global-batch statistics across ``process_group`` (module docstring).

    Same arguments, parameters, buffers and state-dict keys as ``nn.BatchNorm2d`` (any input of
    shape ``(B, C, *)`` is accepted), plus:

    Args:
        process_group: the ranks whose batches are pooled (default: the world).

    Shapes:
        ``(B_r, C, *) -> (B_r, C, *)``; ``B_r`` may differ between ranks.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm: expected a (B, C, *) input of at least 2 dimensions, got shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or world_size(self.process_group) == 1:
            return super().forward(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm: expected {self.num_features} channels, got input of shape {tuple(input.shape)}"
            )
        return self._global_batch_norm(input)

    def _global_batch_norm(self, input: Tensor) -> Tensor:
        c = self.num_features
        dims = [0, *range(2, input.dim())]
        shape = (1, c) + (1,) * (input.dim() - 2)
        # Half-precision inputs: statistics in float32 (as BatchNorm's kernels accumulate).
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        n_local = input.numel() // c
        mean_local = x.sum(dims) / max(n_local, 1)
        m2_local = (x - mean_local.view(shape)).square().sum(dims)
        record = torch.cat((mean_local, m2_local, x.new_full((1,), float(n_local))))
        # (N, 2C + 1); C is num_features on every rank, so the shape exchange is skipped.
        stats = all_gather_cat(record.unsqueeze(0), 0, self.process_group, check_shapes=False)
        means, m2s, counts = stats[:, :c], stats[:, c : 2 * c], stats[:, 2 * c :]
        n = counts.sum()
        if n_local <= 1 and n.item() <= 1:  # only ranks that may be alone read n: no sync otherwise
            raise ValueError(
                "SyncBatchNorm: expected more than 1 value per channel in the global batch "
                f"when training, got {int(n.item())} (input shape {tuple(input.shape)})"
            )
        mean = (counts * means).sum(0) / n
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        var = m2 / n
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and not stats_frozen():
            self._update_running_stats(mean.detach(), (m2 / (n - 1)).detach())
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        assert self.running_mean is not None and self.running_var is not None
        self.running_mean.copy_(mean.to(self.running_mean.dtype) * factor + self.running_mean * (1.0 - factor))
        self.running_var.copy_(unbiased_var.to(self.running_var.dtype) * factor + self.running_var * (1.0 - factor))


def convert_sync_batchnorm(module: nn.Module, process_group: ProcessGroup | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`SyncBatchNorm`.

    The new layers take over the old ones' parameter and buffer tensors themselves (so optimizers,
    ``requires_grad`` and the state dict carry over unchanged) and their train/eval flag.

    Args:
        module: any module; changed in place.
        process_group: handed to every new layer (default: the world).

    Returns:
        ``module``, or the new layer when ``module`` itself is a BatchNorm.
    """
    if isinstance(module, _PLAIN_BATCHNORMS):
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
            device="meta",
        )
        # Take over the tensors themselves (no copies), with their devices, dtypes and flags.
        for name, p in module.named_parameters(recurse=False):
            setattr(sync, name, p)
        for name, b in module.named_buffers(recurse=False):
            setattr(sync, name, b)
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
