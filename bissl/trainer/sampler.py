"""Resumable, deterministic mini-batch order.

Epoch ``e`` visits the samples in ``randperm(n)`` drawn from a generator seeded with
``derive_seed(seed, e)``, so the whole data order is a function of ``(seed, epoch, position)`` and
a checkpoint only needs those counters to continue the exact same sequence of batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bissl.trainer.rng import derive_seed


class EpochSampler:
    """Shuffled index batches, epoch after epoch, with the last incomplete batch dropped.

    Dropping the remainder keeps every batch the same size (contrastive losses and BatchNorm
    depend on it); a different permutation each epoch means every sample is still seen.
    A ``batch_size`` larger than ``n`` is reduced to ``n``.

    Args:
        n: number of samples.
        batch_size: samples per batch.
        seed: base seed of the order.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n <= 0:
            raise ValueError(f"EpochSampler: the dataset is empty (n={n})")
        if batch_size <= 0:
            raise ValueError(f"EpochSampler: batch_size must be positive, got {batch_size}")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm: Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def _permutation(self) -> Tensor:
        if self._perm is None:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            self._perm = torch.randperm(self.n, generator=gen)
        return self._perm

    def next_batch(self) -> Tensor:
        """``(batch_size,)`` int64 indices of the next batch (CPU)."""
        if self.pos >= self.steps_per_epoch:
            self.epoch += 1
            self.pos = 0
            self._perm = None
        start = self.pos * self.batch_size
        self.pos += 1
        return self._permutation()[start : start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("n", "batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"EpochSampler: checkpoint has {key}={state[key]}, this run "
                    f"{getattr(self, key)} (the data or config changed)"
                )
        self.epoch, self.pos, self._perm = state["epoch"], state["pos"], None


def gather(tensor: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    """``tensor[idx]`` moved to ``device`` (non-blocking when the source is pinned)."""
    return tensor[idx].to(device, non_blocking=True)
