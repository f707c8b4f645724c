"""bissl.ops.prox_grad: ∇L_P(θ) + λ(θ − φ) — every backend vs the torch reference."""

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
from bissl.ops.fused import prox_grad
from bissl.ops.reference import prox_grad_ref

LAM = 0.001  # BiSSL's default proximal weight


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", size_params())
def test_prox_grad_matches_reference(backend, dtype, size):
    n = resolve_size(size, backend)
    grad, theta, phi = randn(n, dtype), randn(n, dtype), randn(n, dtype)
    exact = grad.double() + LAM * (theta.double() - phi.double())

    out = prox_grad(grad, theta, phi, LAM, backend=backend)

    assert out.shape == (n,) and out.dtype == dtype
    assert_within_reference_error(
        "prox_grad", out, prox_grad_ref(grad, theta, phi, LAM), exact, exact.abs().max().item()
    )


@pytest.mark.parametrize("backend", backend_params())
def test_prox_grad_rejects_bad_layouts(backend):
    grad, theta, phi = randn(33, torch.float32), randn(33, torch.float32), randn(33, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        prox_grad(grad, non_contiguous(theta), phi, LAM, backend=backend)
    with pytest.raises(TypeError, match="Python number"):
        prox_grad(grad, theta, phi, "0.1", backend=backend)


def test_prox_grad_opcheck():
    grad, theta, phi = randn(37, torch.float64), randn(37, torch.float64), randn(37, torch.float64)
    torch.library.opcheck(_library.dispatcher_op("prox_grad").default, (grad, theta, phi, LAM))
