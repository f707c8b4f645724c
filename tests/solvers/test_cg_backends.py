"""cg_solve reaches the same solution with every fused-op backend (float64 SPD vs a dense solve)."""

from __future__ import annotations

import pytest
import torch

from bissl.ops import _backends
from bissl.solvers import cg_solve


def _backend_params() -> list:
    params = []
    for name in _backends.BACKENDS:
        status = _backends.backend_status(name)
        ok = name == "torch" or (status.available and "cpu" in status.devices)
        marks = () if ok else pytest.mark.skip(reason=f"{name} unavailable on CPU: {status.detail}")
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _spd_system(n: int, cond: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    eigs = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return (q * eigs) @ q.T, torch.randn(n, dtype=torch.float64)


@pytest.mark.parametrize("backend", _backend_params())
def test_cg_solves_spd_system_like_a_dense_solve(backend):
    a, b = _spd_system(97, cond=50.0)
    scale, damping = 1.0 / 10.001, 1.0  # BiSSL's (I + H/(λ+λ_damp)) form
    exact = torch.linalg.solve(scale * a + damping * torch.eye(97, dtype=torch.float64), b)

    res = cg_solve(lambda v: a @ v, b, iters=60, scale=scale, damping=damping, backend=backend)

    assert not bool(res.negative_curvature) and not bool(res.nonfinite)
    torch.testing.assert_close(res.x, exact, rtol=1e-10, atol=1e-12)


def test_every_backend_takes_the_same_iterates():
    kernels = [n for n in _backends.available_backends("cpu") if n != "torch"]
    if not kernels:  # torch against torch would prove nothing
        why = "; ".join(f"{n}: {_backends.backend_status(n).detail}" for n in ("cpp", "triton"))
        pytest.skip(f"no compiled or Triton backend runs on CPU here ({why})")
    a, b = _spd_system(257, cond=1e3)
    runs = {name: cg_solve(lambda v: a @ v, b, iters=5, backend=name) for name in _backends.available_backends("cpu")}
    ref = runs["torch"]
    for name, res in runs.items():
        # Five iterations from x0 = 0 (the BiSSL setting): far from converged, so any difference in
        # the vector updates would show; only float64 rounding may differ.
        torch.testing.assert_close(res.x, ref.x, rtol=1e-12, atol=1e-14, msg=f"{name} vs torch")
        torch.testing.assert_close(res.alphas, ref.alphas, rtol=1e-12, atol=0, msg=f"{name} alphas")
        torch.testing.assert_close(res.betas, ref.betas, rtol=1e-12, atol=0, msg=f"{name} betas")
