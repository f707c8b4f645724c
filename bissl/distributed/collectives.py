"""Bucketed collectives on flat buffers.

The BiSSL reference all-reduces every parameter tensor separately (one collective per tensor, ~60
for a ResNet-18, per HVP). Here a vector lives in one contiguous ``(P,)`` buffer
(:mod:`bissl.ops.flat`), so averaging it across ranks is **one** ``all_reduce``, or
``ceil(P / bucket_numel)`` when a bucket size is given (bounded message size; the buckets are
issued asynchronously and waited on together, so they pipeline).

Every rank ends with bit-identical values: a ring or tree all-reduce hands each rank the same
reduced chunk, and the division by the world size is the same float operation everywhere. That
is what keeps CG's scalars, and hence its whole state, identical on all ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def world_size(group: ProcessGroup | None = None) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialised."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 when torch.distributed is not initialised."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def _check_bucket(bucket_numel: int | None) -> None:
    if bucket_numel is not None and (
        not isinstance(bucket_numel, int) or isinstance(bucket_numel, bool) or bucket_numel < 1
    ):
        raise ValueError(f"bucket_numel must be a positive int or None, got {bucket_numel!r}")


def allreduce_mean_(flat: Tensor, *, group: ProcessGroup | None = None, bucket_numel: int | None = None) -> int:
    """Average a flat buffer over the ranks of ``group``, in place.

    Args:
        flat: ``(P,)`` contiguous floating-point tensor (the same ``P`` on every rank).
        group: process group (default: the world).
        bucket_numel: ``None`` (default) reduces the whole buffer in one collective; an int
            splits it into views of at most that many elements, one asynchronous collective each.

    Returns:
        The number of collectives issued (0 with a single rank).

    Raises:
        ValueError: ``flat`` is not a contiguous 1-D floating tensor, or a bad ``bucket_numel``.
    """
    if flat.dim() != 1 or not flat.is_contiguous() or not flat.is_floating_point():
        raise ValueError(
            f"allreduce_mean_: expected a contiguous 1-D floating tensor, got shape "
            f"{tuple(flat.shape)} {flat.dtype} (contiguous={flat.is_contiguous()})"
        )
    _check_bucket(bucket_numel)
    n = world_size(group)
    if n == 1:
        return 0
    if bucket_numel is None or bucket_numel >= flat.numel():
        dist.all_reduce(flat, group=group)
        issued = 1
    else:
        handles = [dist.all_reduce(chunk, group=group, async_op=True) for chunk in flat.split(bucket_numel)]
        for h in handles:
            h.wait()
        issued = len(handles)
    flat.div_(n)
    return issued


def allreduce_mean_tensors_(
    tensors: Sequence[Tensor], *, group: ProcessGroup | None = None, bucket_numel: int | None = None
) -> int:
    """Average many tensors (e.g. the ``.grad`` of every parameter) in place with flat buckets.

    The tensors are packed into one flat buffer per dtype/device (one copy in, one copy out), that
    buffer is averaged by :func:`allreduce_mean_`, and the values are written back.

    Returns:
        The number of collectives issued.
    """
    _check_bucket(bucket_numel)
    if world_size(group) == 1 or not tensors:
        return 0
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"allreduce_mean_tensors_: expected floating tensors, got {t.dtype}")
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    issued = 0
    for group_tensors in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        issued += allreduce_mean_(flat, group=group, bucket_numel=bucket_numel)
        offset = 0
        for t in group_tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return issued


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes: equal digests mean bit-identical tensors."""
    data = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    if data.numel():
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_T = TypeVar("_T")


def gather_objects(obj: _T, *, group: ProcessGroup | None = None) -> list[_T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group);
    every rank sends an object of the same type."""
    if world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return cast(list[_T], out)
