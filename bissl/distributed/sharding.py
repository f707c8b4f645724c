"""Each rank's shard of a global batch.

Every rank draws the same *global* batch (same sampler, same augmentation generator, so the same
samples and the same random augmentations as a single process) and keeps its contiguous slice
along dimension 0: rank ``r`` of ``N`` holds rows ``[r·B/N, (r+1)·B/N)``. The union of the shards is
the single-process batch; with equal shard sizes, the mean of the per-shard mean losses is the
global mean loss (exactly so for losses that are means over samples and do not couple samples).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def check_shardable(batch_size: int, world: int, what: str, *, min_shard: int = 1) -> int:
    """The per-rank shard size of a global batch of ``batch_size``.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world``, or the shard would be smaller
            than ``min_shard`` (the message names ``what``).
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if batch_size % world:
        raise ValueError(
            f"{what} is {batch_size}, not a multiple of the {world} ranks "
            "(each rank takes an equal shard of every global batch)"
        )
    if batch_size // world < min_shard:
        raise ValueError(
            f"{what} is {batch_size}: {batch_size // world} per rank with {world} ranks, at least {min_shard} needed"
        )
    return batch_size // world


def shard_of(tensors: Sequence[Tensor], rank: int, world: int) -> tuple[Tensor, ...]:
    """Rank ``rank``'s contiguous slice of each tensor of a global batch (views, no copy).

    Args:
        tensors: tensors with the same leading batch size ``B``, a multiple of ``world``.
        rank, world: this rank and the number of ranks.

    Returns:
        ``(t[rank·B/world : (rank+1)·B/world] for t in tensors)``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"shard_of: rank {rank} outside [0, {world})")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"shard_of: the tensors have different batch sizes {sorted(sizes)}")
    (n,) = sizes
    size = check_shardable(n, world, "the global batch")
    return tuple(t[rank * size : (rank + 1) * size] for t in tensors)
