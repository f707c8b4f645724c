"""bissl.ops.axpby: a·x + b·y — every backend vs the torch reference."""

from __future__ import annotations

import pytest
import torch
from fused_cases import (
    DTYPES,
    assert_within_reference_error,
    backend_params,
    non_contiguous,
    randn,
    resolve_size,
    size_params,
)

from bissl.ops import _library
from bissl.ops.fused import axpby
from bissl.ops.reference import axpby_ref

A, B = 1.0, 0.01  # the upper combination x + γ·∇L_D(φ) with the first version's γ


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", size_params())
def test_axpby_matches_reference(backend, dtype, size):
    n = resolve_size(size, backend)
    x, y = randn(n, dtype), randn(n, dtype)
    exact = A * x.double() + B * y.double()

    out = axpby(A, x, B, y, backend=backend)

    assert out.shape == (n,) and out.dtype == dtype
    assert_within_reference_error("axpby", out, axpby_ref(A, x, B, y), exact, exact.abs().max().item())


@pytest.mark.parametrize("backend", backend_params())
def test_axpby_rejects_bad_layouts(backend):
    x, y = randn(33, torch.float32), randn(33, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        axpby(A, non_contiguous(x), B, y, backend=backend)
    with pytest.raises(ValueError, match="elements"):
        axpby(A, x, B, y[:5], backend=backend)


def test_axpby_opcheck():
    x, y = randn(37, torch.float64), randn(37, torch.float64)
    torch.library.opcheck(_library.dispatcher_op("axpby").default, (A, x, B, y))
