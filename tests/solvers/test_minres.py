"""MINRES against dense float64 solves on indefinite systems, its minimal-residual property, flags."""

from __future__ import annotations

import pytest
import torch

from bissl.ops import flat_spec, flatten, unflatten
from bissl.solvers import SOLVERS, SolverError, cg_solve, get_solver, minres_solve

F64 = torch.float64


def _indefinite(n: int, seed: int = 0, spread: float = 2.0) -> torch.Tensor:
    """Symmetric with eigenvalues ±logspace(0, spread): half negative, |λ| ≥ 1 (nonsingular)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    mags = torch.logspace(0, spread, n, dtype=F64)
    signs = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0).to(F64)
    return q @ torch.diag(signs * mags) @ q.T


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_minres_matches_dense_solve_on_indefinite_systems(n):
    A = _indefinite(n)
    b = torch.randn(n, dtype=F64)
    res = minres_solve(lambda v: A @ v, b, iters=4 * n + 10)
    assert _rel(res.x, torch.linalg.solve(A, b)) <= 1e-10
    assert bool(res.converged) and res.ok and not bool(res.nonfinite)


def test_scale_and_damping_define_the_system():
    A = _indefinite(15, seed=3)
    b = torch.randn(15, dtype=F64)
    res = minres_solve(lambda v: A @ v, b, iters=80, scale=0.5, damping=0.3)
    M = 0.5 * A + 0.3 * torch.eye(15, dtype=F64)
    assert torch.linalg.eigvalsh(M).min() < 0  # still indefinite
    assert _rel(res.x, torch.linalg.solve(M, b)) <= 1e-10


def test_residual_is_the_minimum_over_the_krylov_space():
    """‖b − M x_k‖ = min over x ∈ K_k(M, b) (least squares on an explicit basis), and it never grows."""
    A = _indefinite(12, seed=4)
    b = torch.randn(12, dtype=F64)
    previous = float("inf")
    for k in range(1, 8):
        res = minres_solve(lambda v: A @ v, b, iters=k)
        K = torch.stack([torch.linalg.matrix_power(A, j) @ b for j in range(k)], 1)
        Q, _ = torch.linalg.qr(K)
        y = torch.linalg.lstsq(A @ Q, b.unsqueeze(1)).solution.squeeze(1)
        best = float((b - A @ Q @ y).norm())
        true_res = float((b - A @ res.x).norm())
        assert true_res == pytest.approx(best, rel=1e-8, abs=1e-12)
        assert float(res.residual_norm) == pytest.approx(true_res, rel=1e-8, abs=1e-12)
        assert true_res <= previous * (1 + 1e-12)
        previous = true_res


def test_on_spd_systems_it_agrees_with_cg():
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    A = q @ torch.diag(torch.logspace(0, 1, 10, dtype=F64)) @ q.T
    b = torch.randn(10, dtype=F64)
    mr = minres_solve(lambda v: A @ v, b, iters=40)
    cg = cg_solve(lambda v: A @ v, b, iters=40)
    assert _rel(mr.x, cg.x) <= 1e-11
    assert not bool(mr.indefinite)


def test_dicts_x0_and_zero_rhs():
    A = _indefinite(5, seed=6)
    b = {"w": torch.randn(2, 2, dtype=F64), "b": torch.randn(1, dtype=F64)}
    spec = flat_spec(b)
    mv = lambda d: unflatten(A @ flatten(d), spec)  # noqa: E731
    exact = torch.linalg.solve(A, flatten(b))
    res = minres_solve(mv, b, iters=30)
    assert set(res.x) == {"w", "b"} and _rel(flatten(res.x), exact) <= 1e-10
    x0 = {k: t + 0.1 for k, t in unflatten(exact, spec).items()}
    warm = minres_solve(mv, b, iters=30, x0=x0)
    assert _rel(flatten(warm.x), exact) <= 1e-10
    zero = minres_solve(lambda v: A @ v, torch.zeros(5, dtype=F64), iters=4, strict=True)
    assert torch.equal(zero.x, torch.zeros(5, dtype=F64)) and int(zero.iters) == 0


def test_extra_iterations_keep_the_answer_finite():
    A = _indefinite(4, seed=7)
    b = torch.randn(4, dtype=F64)
    res = minres_solve(lambda v: A @ v, b, iters=60)
    assert torch.isfinite(res.x).all() and not bool(res.nonfinite)
    assert _rel(res.x, torch.linalg.solve(A, b)) <= 1e-11
    assert int(res.iters) <= 6


def test_indefiniteness_is_reported_but_is_not_a_problem():
    A = _indefinite(20, seed=8)
    b = torch.randn(20, dtype=F64)
    res = minres_solve(lambda v: A @ v, b, iters=10, strict=True)
    true = torch.linalg.eigvalsh(A)
    assert bool(res.indefinite) and res.ok and not bool(res.negative_curvature)
    assert float(true[0]) - 1e-9 <= float(res.ritz_min) < 0 < float(res.ritz_max) <= float(true[-1]) + 1e-9


def test_nan_is_flagged_and_raised():
    b = torch.ones(3, dtype=F64)
    res = minres_solve(lambda v: v * float("nan"), b, iters=3)
    assert bool(res.nonfinite) and "NaN" in res.problems()[0]
    with pytest.raises(SolverError, match="NaN"):
        minres_solve(lambda v: v * float("nan"), b, iters=3, strict=True)


def test_tolerance_mode_stops_early_and_raises_on_non_convergence():
    A = _indefinite(30, seed=9, spread=3.0)
    b = torch.randn(30, dtype=F64)
    res = minres_solve(lambda v: A @ v, b, iters=200, rtol=1e-6)
    assert bool(res.converged) and int(res.iters) < 200
    assert float((b - A @ res.x).norm() / b.norm()) <= 1.01e-6
    with pytest.raises(SolverError, match="no convergence"):
        minres_solve(lambda v: A @ v, b, iters=3, rtol=1e-10, strict=True)


def test_fixed_iteration_mode_makes_no_host_sync():
    A = _indefinite(6, seed=10)
    b = torch.randn(6, dtype=F64)
    calls = []
    orig_bool, orig_item = torch.Tensor.__bool__, torch.Tensor.item
    try:
        torch.Tensor.__bool__ = lambda self: calls.append("bool") or orig_bool(self)
        torch.Tensor.item = lambda self: calls.append("item") or orig_item(self)
        minres_solve(lambda v: A @ v, b, iters=9)
        assert calls == []
        minres_solve(lambda v: A @ v, b, iters=9, rtol=1e-3)
        assert calls, "tolerance mode is expected to sync to stop early"
    finally:
        torch.Tensor.__bool__, torch.Tensor.item = orig_bool, orig_item


def test_registered_and_rejects_bad_input():
    assert SOLVERS["minres"] is minres_solve and get_solver("minres") is minres_solve
    with pytest.raises(ValueError, match="iters"):
        minres_solve(lambda v: v, torch.ones(3, dtype=F64), iters=-2)
    with pytest.raises(ValueError, match="flat"):
        minres_solve(lambda v: v, torch.ones(2, 2), iters=2)
