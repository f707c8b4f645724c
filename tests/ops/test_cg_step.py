"""bissl.ops.cg_step_: x += αp, r −= αAp, rᵀr in one pass — every backend vs the torch reference."""

from __future__ import annotations

import pytest
import torch
from fused_cases import (
    DTYPES,
    assert_within_reference_error,
    backend_params,
    exact_sum,
    non_contiguous,
    randn,
    resolve_size,
    size_params,
    step_size,
)

from bissl.ops import _library
from bissl.ops.fused import cg_step_
from bissl.ops.reference import cg_step_ref_


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", size_params())
def test_cg_step_matches_reference(backend, dtype, size):
    n = resolve_size(size, backend)
    x, r, p, ap = (randn(n, dtype) for _ in range(4))
    alpha = step_size(dtype)
    x_ref, r_ref = x.clone(), r.clone()
    x_exact = x.double() + alpha.double() * p.double()
    r_exact = r.double() - alpha.double() * ap.double()

    rr = cg_step_(x, r, p, ap, alpha, backend=backend)
    rr_ref = cg_step_ref_(x_ref, r_ref, p, ap, alpha)

    assert rr.shape == () and rr.dtype == dtype
    mag_x, mag_r = x_exact.abs().max().item(), r_exact.abs().max().item()
    assert_within_reference_error("x", x, x_ref, x_exact, mag_x)
    assert_within_reference_error("r", r, r_ref, r_exact, mag_r)
    # rᵀr of the residual the kernel produced (its own rounding of r is checked above).
    rr_exact = exact_sum(r.double() ** 2)
    assert_within_reference_error("rr", rr, rr_ref, rr_exact, rr_exact)


@pytest.mark.parametrize("backend", backend_params())
def test_cg_step_rejects_bad_layouts(backend):
    x, r, p, ap = (randn(33, torch.float32) for _ in range(4))
    alpha = step_size(torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        cg_step_(x, non_contiguous(r), p, ap, alpha, backend=backend)
    with pytest.raises(ValueError, match="elements"):
        cg_step_(x, r, p[:-1], ap, alpha, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        cg_step_(x.int(), r.int(), p.int(), ap.int(), alpha, backend=backend)
    with pytest.raises(ValueError, match=r"is torch\.float64"):
        cg_step_(x, r, p.double(), ap, alpha, backend=backend)
    with pytest.raises(TypeError, match="0-dim tensor"):
        cg_step_(x, r, p, ap, 0.5, backend=backend)


@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_cg_step_is_deterministic(backend):
    # Same bits for any thread count (the torch reference's float32 dot is not: it is left out).
    n = 70_001
    x, r, p, ap = (randn(n, torch.float32) for _ in range(4))
    alpha = step_size(torch.float32)
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        xs, rs = x.clone(), r.clone()
        results.append((cg_step_(xs, rs, p, ap, alpha, backend=backend), xs, rs))
    for rr, xs, rs in results[1:]:
        assert torch.equal(rr, results[0][0]) and torch.equal(xs, results[0][1]) and torch.equal(rs, results[0][2])


def test_cg_step_opcheck():
    x, r, p, ap = (randn(37, torch.float64) for _ in range(4))
    torch.library.opcheck(_library.dispatcher_op("cg_step_").default, (x, r, p, ap, step_size(torch.float64)))
