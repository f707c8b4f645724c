"""bissl.ops.cg_direction_: p = r + βp in place — every backend vs the torch reference."""

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
    step_size,
)

from bissl.ops import _library
from bissl.ops.fused import cg_direction_
from bissl.ops.reference import cg_direction_ref_


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", size_params())
def test_cg_direction_matches_reference(backend, dtype, size):
    n = resolve_size(size, backend)
    p, r = randn(n, dtype), randn(n, dtype)
    beta = step_size(dtype)
    p_exact = r.double() + beta.double() * p.double()
    p_ref = cg_direction_ref_(p.clone(), r, beta)

    out = cg_direction_(p, r, beta, backend=backend)

    assert out is p
    assert_within_reference_error("p", p, p_ref, p_exact, p_exact.abs().max().item())


@pytest.mark.parametrize("backend", backend_params())
def test_cg_direction_takes_beta_of_another_dtype(backend):
    # The CG loop may keep β in float64 while the vectors are float32: β is used in their precision.
    p, r = randn(100, torch.float32), randn(100, torch.float32)
    beta = torch.tensor(0.3, dtype=torch.float64)
    expected = r + torch.tensor(0.3, dtype=torch.float32) * p
    torch.testing.assert_close(cg_direction_(p, r, beta, backend=backend), expected, rtol=1.2e-7, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
def test_cg_direction_rejects_bad_layouts(backend):
    p, r = randn(33, torch.float64), randn(33, torch.float64)
    beta = step_size(torch.float64)
    with pytest.raises(ValueError, match="contiguous"):
        cg_direction_(non_contiguous(p), r, beta, backend=backend)
    with pytest.raises(ValueError, match="one element"):
        cg_direction_(p, r, torch.ones(2, dtype=torch.float64), backend=backend)


def test_cg_direction_opcheck():
    p, r = randn(37, torch.float64), randn(37, torch.float64)
    torch.library.opcheck(_library.dispatcher_op("cg_direction_").default, (p, r, step_size(torch.float64)))
