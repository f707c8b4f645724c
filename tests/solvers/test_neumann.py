"""Neumann series: the Lanczos-chosen step converges where the classic step 1 diverges
(‖H‖ > λ + damping), against dense float64 solves and the series written out densely."""

from __future__ import annotations

import itertools

import pytest
import torch

from bissl.solvers import SolverError, neumann_solve

F64 = torch.float64
LAM_PLUS_DAMP = 10.01  # λ = 0.01, damping 10: the demo's system I + H/(λ+damp)


def _hessian(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), generator=g, dtype=F64))
    return q @ torch.diag(eigs.to(F64)) @ q.T


def _system(n: int = 30, top: float = 80.0, seed: int = 0):
    """H with spectrum [0.5, top] (top ≈ the Ritz λ_max of the digits study), M = I + H/c, b."""
    H = _hessian(torch.linspace(0.5, top, n), seed)
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    M = torch.eye(n, dtype=F64) + H / LAM_PLUS_DAMP
    return H, M, b


def _solve(H, b, iters, **kw):
    return neumann_solve(lambda v: H @ v, b, iters=iters, scale=1 / LAM_PLUS_DAMP, damping=1.0, **kw)


def _series(M: torch.Tensor, b: torch.Tensor, eta: float, terms: int) -> torch.Tensor:
    step = torch.eye(M.shape[0], dtype=F64) - eta * M
    return eta * sum(torch.linalg.matrix_power(step, k) @ b for k in range(terms))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_step_one_diverges_when_norm_exceeds_lambda_plus_damping():
    H, M, b = _system()
    assert float(torch.linalg.eigvalsh(H).max()) > LAM_PLUS_DAMP
    exact = torch.linalg.solve(M, b)
    errors = [_rel(_solve(H, b, k, step=1.0).x, exact) for k in (5, 10, 20)]
    assert errors[0] < errors[1] < errors[2] and errors[2] > 1e10  # |1 − 80/10.01 − 1|^19 ≈ 4e17
    with pytest.raises(SolverError, match="diverges"):
        _solve(H, b, 5, step=1.0, strict=True)


def test_lanczos_step_converges_to_the_dense_solve():
    H, M, b = _system()
    exact = torch.linalg.solve(M, b)
    res = _solve(H, b, 400, strict=True)
    assert _rel(res.x, exact) <= 1e-10
    # 10 Lanczos steps on an evenly spread spectrum: an inner estimate, well above λ_max/2 (the
    # step converges while λ_max < 2·ritz_max).
    top = float(torch.linalg.eigvalsh(M).max())
    assert 0.9 * top <= float(res.ritz_max) <= top
    # Safe step, positive definite M: the residual never grows from one term to the next.
    residuals = [float(_solve(H, b, k).residual_norm) for k in (1, 2, 5, 20, 100)]
    assert all(r1 >= r2 for r1, r2 in itertools.pairwise(residuals))


@pytest.mark.parametrize("iters, lanczos_steps", [(5, 10), (25, 3), (7, 6)])
def test_result_is_the_series_with_the_ritz_step(iters, lanczos_steps):
    # Few Lanczos steps: the step comes from a rough ritz_max; the answer is still exactly the
    # series with that step, whether evaluated in the Lanczos basis or by plain updates after it.
    H, M, b = _system(n=12, top=60.0, seed=3)
    res = _solve(H, b, iters, lanczos_steps=lanczos_steps)
    eta = 1.0 / float(res.ritz_max)
    assert float(res.ritz_max) <= float(torch.linalg.eigvalsh(M).max()) * (1 + 1e-12)
    assert _rel(res.x, _series(M, b, eta, iters)) <= 1e-11
    residual_before_last = b - M @ _series(M, b, eta, iters - 1)
    assert float(res.residual_norm) == pytest.approx(float(residual_before_last.norm()), rel=1e-9)


def test_explicit_step_is_the_series():
    H, M, b = _system(n=8, top=5.0)
    res = _solve(H, b, 6, step=0.7, strict=True)
    assert _rel(res.x, _series(M, b, 0.7, 6)) <= 1e-12


def test_indefinite_system_is_flagged():
    eigs = torch.linspace(-30.0, 40.0, 16)  # M = I + H/10.01 has eigenvalues down to -2
    H = _hessian(eigs, seed=2)
    b = torch.randn(16, dtype=F64, generator=torch.Generator().manual_seed(5))
    res = _solve(H, b, 8)
    assert bool(res.indefinite) and float(res.ritz_min) < 0
    with pytest.raises(SolverError, match="indefinite"):
        _solve(H, b, 8, strict=True)


def test_zero_rhs_and_invariant_krylov_space():
    H = torch.diag(torch.tensor([2.0, 50.0, 90.0], dtype=F64))
    zero = _solve(H, torch.zeros(3, dtype=F64), 6)
    assert torch.equal(zero.x, torch.zeros(3, dtype=F64)) and not bool(zero.nonfinite)
    # b an eigenvector: β_1 = 0, the Krylov space closes after one step; the answer is b/μ.
    b = torch.tensor([0.0, 3.0, 0.0], dtype=F64)
    res = _solve(H, b, 4, strict=True)
    assert _rel(res.x, b / (1 + 50.0 / LAM_PLUS_DAMP)) <= 1e-14


def test_dict_and_float32_inputs():
    H, M, b = _system(n=10, top=40.0)
    res = neumann_solve(lambda v: {"w": H @ v["w"]}, {"w": b}, iters=300, scale=1 / LAM_PLUS_DAMP, damping=1.0)
    assert _rel(res.x["w"], torch.linalg.solve(M, b)) <= 1e-10
    H32, b32 = H.float(), b.float()
    res32 = neumann_solve(lambda v: H32 @ v, b32, iters=300, scale=1 / LAM_PLUS_DAMP, damping=1.0)
    assert res32.x.dtype == torch.float32
    assert _rel(res32.x.double(), torch.linalg.solve(M, b)) <= 1e-5


@pytest.mark.parametrize(
    "kw, match", [({"step": 0.0}, "step"), ({"lanczos_steps": -1}, "lanczos"), ({"iters": -1}, "iters")]
)
def test_bad_arguments(kw, match):
    H, _, b = _system(n=4)
    args = {"iters": 3, **kw}
    with pytest.raises(ValueError, match=match):
        _solve(H, b, **args)


@pytest.mark.parametrize("iters, lanczos_steps", [(1, 10), (5, 10), (30, 4)])
def test_matvec_count_is_that_of_the_plain_series(iters, lanczos_steps):
    H, _, b = _system(n=12)
    calls = []

    def mv(v):
        calls.append(1)
        return H @ v

    neumann_solve(mv, b, iters=iters, scale=1 / LAM_PLUS_DAMP, damping=1.0, lanczos_steps=lanczos_steps)
    assert len(calls) == iters - 1
