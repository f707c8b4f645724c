"""bissl.ops.damped_matvec: Av = scale·Hv + shift·v and vᵀAv — every backend vs the reference."""

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
)

from bissl.ops import _library
from bissl.ops.fused import damped_matvec
from bissl.ops.reference import damped_matvec_ref

# BiSSL's operator: scale = 1/(λ + λ_damp), shift = 1 (see bissl.solvers.cg_solve).
SCALE, SHIFT = 1.0 / 10.001, 1.0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", size_params())
def test_damped_matvec_matches_reference(backend, dtype, size):
    n = resolve_size(size, backend)
    hv, v = randn(n, dtype), randn(n, dtype)
    av_exact = SCALE * hv.double() + SHIFT * v.double()

    av, vav = damped_matvec(hv, v, SCALE, SHIFT, backend=backend)
    av_ref, vav_ref = damped_matvec_ref(hv, v, SCALE, SHIFT)

    assert av.shape == (n,) and av.dtype == dtype and vav.shape == () and vav.dtype == dtype
    assert_within_reference_error("Av", av, av_ref, av_exact, av_exact.abs().max().item())
    # vᵀAv of the Av the kernel produced.
    terms = v.double() * av.double()
    assert_within_reference_error("vAv", vav, vav_ref, exact_sum(terms), exact_sum(terms.abs()))


@pytest.mark.parametrize("backend", backend_params())
def test_damped_matvec_without_shift_and_negative_scale(backend):
    hv, v = randn(513, torch.float64), randn(513, torch.float64)
    av, vav = damped_matvec(hv, v, -2.5, 0.0, backend=backend)
    torch.testing.assert_close(av, -2.5 * hv, rtol=0, atol=0)
    torch.testing.assert_close(vav, torch.dot(v, -2.5 * hv), rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_damped_matvec_rejects_bad_layouts(backend):
    hv, v = randn(33, torch.float32), randn(33, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        damped_matvec(non_contiguous(hv), v, SCALE, SHIFT, backend=backend)
    with pytest.raises(ValueError, match="flat"):
        damped_matvec(hv.view(3, 11), v.view(3, 11), SCALE, SHIFT, backend=backend)
    with pytest.raises(TypeError, match="Python number"):
        damped_matvec(hv, v, torch.tensor(SCALE), SHIFT, backend=backend)


@pytest.mark.parametrize("backend", backend_params(kernels_only=True))
def test_damped_matvec_is_deterministic(backend):
    hv, v = randn(70_001, torch.float32), randn(70_001, torch.float32)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(damped_matvec(hv, v, SCALE, SHIFT, backend=backend))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_damped_matvec_opcheck():
    hv, v = randn(37, torch.float64), randn(37, torch.float64)
    torch.library.opcheck(_library.dispatcher_op("damped_matvec").default, (hv, v, SCALE, SHIFT))
