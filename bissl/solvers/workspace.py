"""Work buffers that outlive one solve, for callers that solve again and again.

Why this exists (CPU): PyTorch takes a large tensor's memory from glibc ``malloc``, which serves any
block above its mmap threshold (32 MiB at most on 64-bit Linux) with a fresh ``mmap`` and unmaps it
on free. Each new ``(P,)`` work vector of a large model (ResNet-18: 11.2 M float32 values, 45 MB)
therefore faults on every 4 KiB page the first time it is written, on every solve: about 11,000
minor faults per vector, which ``benchmarks/bench_allocator.py`` measures. A solver makes three or
four such vectors per solve, on the order of the vector updates' own time. Passing one
:class:`Workspace` to repeated solves keeps those buffers mapped, so only the first solve pays.

On CUDA the caching allocator already reuses blocks; a workspace there only pins memory.

Contract:

* the *answer* ``x`` is never a workspace buffer: a returned result stays valid after later solves;
* one solve at a time: a solve that starts while another solve holding the same workspace is still
  running (a matvec that itself solves with it) raises ``RuntimeError`` instead of sharing
  buffers; give the inner solve its own workspace;
* a buffer is replaced when the problem's size, dtype or device changes (then the old one is freed).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor


class Workspace:
    """Named flat buffers kept from one solve to the next (module docstring).

    Example:
        >>> ws = Workspace()
        >>> for batch in batches:                       # the matvec changes, the size does not
        ...     res = cg_solve(hvp_of(batch), g, iters=5, workspace=ws)
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._owner: weakref.ref | None = None
        self._owner_name = ""

    def check_free(self, where: str) -> None:
        """Raise ``RuntimeError`` if an unfinished solve holds the workspace."""
        if self._owner is not None and self._owner() is not None:
            raise RuntimeError(
                f"{where}: this Workspace is in use by an unfinished {self._owner_name} (a solve inside "
                "another solve's matvec, or a solve that raised and is still referenced); give each "
                "concurrent solve its own Workspace"
            )

    def acquire(self, owner: object, where: str) -> None:
        """Mark the workspace as used by the solve ``owner`` (released by :meth:`release`, or when
        ``owner`` is garbage-collected, e.g. after the solve raised)."""
        self.check_free(where)
        self._owner, self._owner_name = weakref.ref(owner), where

    def release(self, owner: object) -> None:
        """End ``owner``'s use (a no-op if another solve holds the workspace)."""
        if self._owner is not None and self._owner() is owner:
            self._owner = None

    def buffer(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The ``(numel,)`` buffer named ``slot`` (uninitialised contents: the last solve's values)."""
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(slot, None)  # free the old one before allocating its replacement
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[slot] = buf
        return buf

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        """Free every buffer (the next solve allocates again)."""
        self._buffers.clear()

    def __repr__(self) -> str:
        return f"Workspace({len(self._buffers)} buffers, {self.nbytes / 2**20:.1f} MiB)"
