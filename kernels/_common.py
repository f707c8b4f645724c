"""Launch configuration shared by the Triton kernels.

Autotuning benchmarks several configs on the first call for each size; under the interpreter
(``TRITON_INTERPRET=1``, how the tests run Triton on CPU) there is nothing to time and the
autotuner's benchmarking path does not run, so a single config is used there. In-place kernels
pass ``restore_value`` so the autotuner's trial runs do not apply the update several times.

Reductions are deterministic: every program reduces a fixed ``chunk`` of the vector (its size
depends only on ``P``, not on the tuned ``BLOCK``), writes one float64 partial, and the partials
are summed in a fixed order by ``torch.sum``; there are no atomics.
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

#: True when kernels run on the CPU interpreter (set before triton is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def elementwise_configs() -> list[triton.Config]:
    """Autotune candidates; a single one under the interpreter."""
    if INTERPRET:
        # Large blocks: the interpreter's cost is per program, not per element.
        return [triton.Config({"BLOCK": 4096}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block in (1024, 2048, 4096)
        for warps in (4, 8)
    ]


def reduction_configs() -> list[triton.Config]:
    """Autotune candidates of the chunked reductions (``BLOCK`` divides every chunk).

    Under the interpreter ``BLOCK`` is a quarter of the smallest chunk so the tests run the
    in-program loop over several blocks, as compiled kernels do at large sizes.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK": MIN_CHUNK // 4}, num_warps=4)]
    return elementwise_configs()


#: Smallest and largest reduction chunk per program (powers of two, >= the largest BLOCK).
MIN_CHUNK, MAX_CHUNK = 4096, 65536


def reduction_chunk(n: int) -> int:
    """Elements per program for a reduction over ``n``: about 2048 programs at large ``n``.

    Enough programs to fill a GPU (hundreds of SMs' worth) without making the float64 partials
    pass significant; a function of ``n`` only, so results do not depend on the tuned config.
    """
    target = triton.cdiv(max(n, 1), 2048)
    return min(MAX_CHUNK, max(MIN_CHUNK, triton.next_power_of_2(target)))


def partials_buffer(n: int, chunk: int, like: Tensor) -> Tensor:
    """One float64 slot per program (every slot is written by the kernel)."""
    return torch.empty(triton.cdiv(max(n, 1), chunk), dtype=torch.float64, device=like.device)


def sum_partials(partials: Tensor, dtype: torch.dtype) -> Tensor:
    """0-dim tensor of ``dtype``: the fixed-order float64 sum of the per-program partials."""
    return partials.sum().to(dtype)


def scalar_on_device(value: Tensor, like: Tensor) -> Tensor:
    """A step size as a one-element tensor of ``like``'s dtype on its device (no host sync)."""
    return value.reshape(1).to(device=like.device, dtype=like.dtype, non_blocking=True)
