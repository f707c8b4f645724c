"""Each rank keeps only its partition of the hypergradient's vectors (sharded CG under ZeRO-3).

:class:`ShardLayout` partitions a flat ``(P,)`` vector — the parameter tensors concatenated —
the way ZeRO-3 partitions parameters: tensor ``i`` with ``n_i`` entries is cut into ``N`` chunks of
``c_i = ⌈n_i / N⌉`` (the last one zero-padded), and rank ``r`` holds chunk ``r`` of every tensor, a
local vector of ``L = Σ c_i ≈ P / N`` entries. :class:`ShardedSpace` solves BiSSL's system on such
partitions (the :class:`~bissl.hypergrad.implicit.VectorSpace` of :func:`implicit_hypergrad`):

* right-hand side: this rank's ``∇_θ L_D`` (whole, from its shard of the batch) is
  reduce-scattered, averaged, into the partition;
* operator: the partition of ``p`` is all-gathered into the whole vector, the HVP runs on the
  whole θ (gathered, as ZeRO-3's own forward/backward do), and the result is reduce-scattered
  (averaged) back into the partition;
* dot products: one all-reduce of the partial sums per dot (padding entries are zero in every
  vector, so they add nothing); every scalar — α, β, the flags, the Ritz values — is therefore
  identical on all ranks, and in fixed-iteration mode the solve still makes no host sync;
* the answer is all-gathered once at the end.

So CG's ``x, r, p, Ap`` and ``b`` cost ``5·P/N`` entries per rank instead of ``5·P``; what stays whole
is transient (the gathered θ and the HVP's own input and output while it runs).

Collectives: NCCL has a reduce-scatter; gloo does not, so there it is an all-reduce of the whole
vector followed by taking this rank's entries (the same numbers, twice the traffic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from bissl.distributed.collectives import ProcessGroup, world_size
from bissl.distributed.collectives import rank as current_rank
from bissl.ops.flat import FlatSpec
from bissl.typing import ParamsLike


class ShardLayout:
    """ZeRO-3-style partition of flat ``(P,)`` vectors across ``world`` ranks (module docstring).

    Args:
        numels: entries of each parameter tensor, in flat order (``P = sum(numels)``).
        world, rank: the ranks and this one.
        device: where the index tensors live.
    """

    def __init__(self, numels: Sequence[int], world: int, rank: int, device: torch.device | str = "cpu") -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardLayout: rank {rank} outside [0, {world})")
        self.numels = [int(n) for n in numels]
        self.world, self.rank = world, rank
        self.numel = sum(self.numels)
        chunks = [-(-n // world) for n in self.numels]  # ⌈n/N⌉
        self.local_numel = sum(chunks)
        # index[r, j]: flat position held by rank r in local slot j; padding points at P, a zero slot.
        index = torch.full((world, self.local_numel), self.numel, dtype=torch.int64)
        segment = torch.empty(self.local_numel, dtype=torch.int64)
        offset = slot = 0
        for i, (n, c) in enumerate(zip(self.numels, chunks)):
            for r in range(world):
                lo, hi = min(r * c, n), min((r + 1) * c, n)
                index[r, slot : slot + hi - lo] = torch.arange(offset + lo, offset + hi)
            segment[slot : slot + c] = i
            offset += n
            slot += c
        self.index = index.to(device)
        self.local_index = self.index[rank]
        self.local_segments = segment.to(device)

    def local(self, full: Tensor) -> Tensor:
        """This rank's partition ``(L,)`` of a whole ``(P,)`` vector (no communication)."""
        return torch.cat([full, full.new_zeros(1)])[self.local_index]

    def all_gather(self, part: Tensor, group: ProcessGroup | None = None) -> Tensor:
        """The whole ``(P,)`` vector from every rank's partition (one all-gather)."""
        if self.world == 1:
            return self._scatter(part[None])
        parts = part.new_empty(self.world * self.local_numel)
        dist.all_gather_into_tensor(parts, part.contiguous(), group=group)
        return self._scatter(parts.view(self.world, self.local_numel))

    def _scatter(self, parts: Tensor) -> Tensor:
        full = parts.new_zeros(self.numel + 1)
        full[self.index[: parts.shape[0]].reshape(-1)] = parts.reshape(-1)
        return full[: self.numel]

    def reduce_scatter_mean(self, full: Tensor, group: ProcessGroup | None = None) -> Tensor:
        """This rank's partition of the rank-average of a whole ``(P,)`` vector."""
        if self.world == 1:
            return self.local(full)
        if dist.get_backend(group) == "nccl":
            parts = torch.cat([full, full.new_zeros(1)])[self.index]  # (N, L), rank-major
            out = full.new_empty(self.local_numel)
            dist.reduce_scatter_tensor(out, parts.reshape(-1), group=group)
        else:  # gloo has no reduce-scatter
            summed = full.clone()
            dist.all_reduce(summed, group=group)
            out = self.local(summed)
        return out.div_(self.world)

    def segments(self, spec: FlatSpec) -> Tensor:
        """Tensor index of each local slot (layer-wise CG); padding belongs to its tensor."""
        if [int(n) for n in spec.numels] != self.numels:
            raise ValueError("ShardLayout.segments: the spec's tensors differ from the layout's")
        return self.local_segments


class ShardedSpace:
    """The :class:`~bissl.hypergrad.implicit.VectorSpace` of a partitioned solve (module docstring).

    Args:
        layout: the partition.
        group: process group (default: the world).
        on_rhs: called once with the whole rank-averaged right-hand side (gathered for it).
    """

    def __init__(
        self, layout: ShardLayout, *, group: ProcessGroup | None = None, on_rhs: Callable[[Tensor], None] | None = None
    ) -> None:
        self.layout, self.group, self.on_rhs = layout, group, on_rhs
        self.allreduce: Callable[[Tensor], Tensor] | None = self._allreduce if layout.world > 1 else None

    def _allreduce(self, partial: Tensor) -> Tensor:
        out = partial.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def rhs(self, v: Tensor) -> Tensor:
        b = self.layout.reduce_scatter_mean(v, self.group)
        if self.on_rhs is not None:
            self.on_rhs(self.layout.all_gather(b, self.group))
        return b

    def operator(self, matvec: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        layout, group = self.layout, self.group

        def sharded(p: Tensor) -> Tensor:
            return layout.reduce_scatter_mean(matvec(layout.all_gather(p, group)), group)

        return sharded

    def solution(self, x: Tensor) -> Tensor:
        return self.layout.all_gather(x, self.group)

    def segments(self, spec: FlatSpec) -> Tensor:
        return self.layout.segments(spec)


def sharded_space(
    lower_params: ParamsLike, *, group: ProcessGroup | None = None, on_rhs: Callable[[Tensor], None] | None = None
) -> ShardedSpace:
    """The :class:`ShardedSpace` partitioning ``lower_params``' flat vector across the ranks of
    ``group``: pass it as ``space`` to :func:`~bissl.hypergrad.implicit_hypergrad` for the sharded
    solve (see the module docstring; same answer as the unsharded solve)."""
    first = next(iter(lower_params.values()))
    layout = ShardLayout(
        [t.numel() for t in lower_params.values()], world_size(group), current_rank(group), first.device
    )
    return ShardedSpace(layout, group=group, on_rhs=on_rhs)
