"""Shared parametrisation and tolerance rule of the fused-op tests (tests/ops/test_<op>.py).

Tolerance rule (flash-attention's): a backend's error against an exact answer must be at most
twice the error of the plain-torch reference run in the same precision, plus a floor of two
units of rounding of the result's magnitude (so a 1-ulp difference, e.g. from an FMA, passes when
the reference happens to be exact). "Exact" is computed in float64 from the (float32) inputs,
with reductions summed exactly by ``math.fsum``; for float64 inputs it is the float64 elementwise
result and the exactly summed reduction.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bissl.ops import _backends

DTYPES = (torch.float32, torch.float64)
#: Odd sizes: a single element, a partial block, one past a power of two, several chunks.
SMALL_SIZES = (1, 7, 4097)
BIG = 1_000_003
#: The Triton interpreter takes ~1 s per op at 1e6 elements: it gets a smaller "big" size that
#: still spans many programs and chunk boundaries.
TRITON_BIG = 100_003


def backend_params(kernels_only: bool = False) -> list:
    """Every backend as a pytest param, skipped (with the diagnosis) where it cannot run on CPU.

    ``kernels_only`` leaves out the torch reference (for properties only our kernels promise).
    """
    params = []
    for name in _backends.BACKENDS:
        if kernels_only and name == "torch":
            continue
        status = _backends.backend_status(name)
        runs_here = name == "torch" or (status.available and "cpu" in status.devices)
        marks = () if runs_here else pytest.mark.skip(reason=f"{name} backend unavailable on CPU: {status.detail}")
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def size_params() -> list:
    return [pytest.param(n, id=str(n)) for n in SMALL_SIZES] + [pytest.param("big", id="big")]


def resolve_size(n: int | str, backend: str) -> int:
    if n == "big":
        return TRITON_BIG if backend == "triton" else BIG
    return int(n)


def randn(n: int, dtype: torch.dtype) -> Tensor:
    """Random (never all-zero) vector."""
    return torch.randn(n, dtype=dtype)


def step_size(dtype: torch.dtype) -> Tensor:
    """A random 0-dim step size in [0.25, 1.25) (nonzero)."""
    return (torch.rand((), dtype=torch.float64) + 0.25).to(dtype)


def exact_sum(terms: Tensor) -> float:
    """Correctly rounded float64 sum of float64 ``terms``."""
    return math.fsum(terms.double().tolist())


def assert_within_reference_error(
    what: str, got: Tensor, torch_same_precision: Tensor, exact: Tensor | float, magnitude: float
) -> None:
    """``max|got − exact| ≤ 2·max|torch − exact| + 2·eps·magnitude`` (see the module docstring)."""
    exact_t = torch.as_tensor(exact, dtype=torch.float64)
    err = (got.double() - exact_t).abs().max().item()
    ref_err = (torch_same_precision.double() - exact_t).abs().max().item()
    floor = 2 * torch.finfo(got.dtype).eps * magnitude
    assert got.dtype == torch_same_precision.dtype, f"{what}: dtype {got.dtype} != {torch_same_precision.dtype}"
    assert err <= 2 * ref_err + floor, f"{what}: error {err:.3e} exceeds 2 x torch's {ref_err:.3e} + floor {floor:.3e}"


def non_contiguous(t: Tensor) -> Tensor:
    """Same values as ``t`` but every other element of a twice-as-long buffer (stride 2)."""
    wide = torch.empty(2 * t.numel(), dtype=t.dtype)
    wide[::2] = t
    return wide[::2]
