"""Ritz estimates from CG's own α/β: against explicit Krylov projections and the dense spectrum."""

from __future__ import annotations

import pytest
import torch

from bissl.solvers import cg_layerwise_solve, cg_solve, minres_solve
from bissl.solvers.lanczos import cg_tridiagonal

F64 = torch.float64


def _sym(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    return q @ torch.diag(eigs.to(F64)) @ q.T


def _krylov_ritz(M: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Eigenvalues of Qᵀ M Q, Q an orthonormal basis of span{b, Mb, …, M^{k−1}b} (the oracle)."""
    cols, v = [], b / b.norm()
    for _ in range(k):
        cols.append(v)
        v = M @ v
        v = v / v.norm()
    Q, _ = torch.linalg.qr(torch.stack(cols, 1))
    return torch.linalg.eigvalsh(Q.T @ M @ Q)


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_cg_ritz_values_are_the_krylov_projection_eigenvalues(k):
    A = _sym(torch.logspace(0, 2, 20))
    b = torch.randn(20, dtype=F64)
    scale, damping = 0.3, 2.0
    res = cg_solve(lambda v: A @ v, b, iters=k, scale=scale, damping=damping)
    M = scale * A + damping * torch.eye(20, dtype=F64)
    expected = _krylov_ritz(M, b, k)
    assert torch.allclose(res.ritz_values(), expected, rtol=1e-9, atol=1e-9)
    assert float(res.ritz_min) == pytest.approx(float(expected[0]), rel=1e-9)
    assert float(res.ritz_max) == pytest.approx(float(expected[-1]), rel=1e-9)


def test_ritz_extremes_lie_inside_the_spectrum_and_approach_it():
    eigs = torch.linspace(0.5, 40.0, 30)
    A = _sym(eigs, seed=1)
    b = torch.randn(30, dtype=F64)
    true = torch.linalg.eigvalsh(A)
    lows, highs = [], []
    for k in (1, 3, 6, 12, 30):
        res = cg_solve(lambda v: A @ v, b, iters=k)
        lo, hi = float(res.ritz_min), float(res.ritz_max)
        assert float(true[0]) - 1e-10 <= lo <= hi <= float(true[-1]) + 1e-10
        assert float(res.condition_estimate) <= float(true[-1] / true[0]) * (1 + 1e-10)
        lows.append(lo)
        highs.append(hi)
    assert lows == sorted(lows, reverse=True) and highs == sorted(highs)
    assert lows[-1] == pytest.approx(float(true[0]), rel=1e-8)
    assert highs[-1] == pytest.approx(float(true[-1]), rel=1e-8)
    assert float(res.condition_estimate) == pytest.approx(80.0, rel=1e-7)
    assert not bool(res.indefinite)


def test_iterations_after_convergence_do_not_change_the_estimates():
    A = _sym(torch.tensor([1.0, 2.0, 5.0, 9.0]))
    b = torch.randn(4, dtype=F64)
    exact = cg_solve(lambda v: A @ v, b, iters=4)
    padded = cg_solve(lambda v: A @ v, b, iters=25)  # 21 skipped iterations are padding
    assert float(padded.ritz_min) == pytest.approx(1.0, rel=1e-10)
    assert float(padded.ritz_max) == pytest.approx(9.0, rel=1e-10)
    assert torch.allclose(padded.ritz_values(), exact.ritz_values(), rtol=1e-10)


def test_negative_curvature_row_gives_a_negative_ritz_value():
    """CG stops at pᵀAp ≤ 0, but the breaking row of T is known: Ritz values of K_{m+1} exactly."""
    A = _sym(torch.tensor([-3.0, 0.5, 1.0, 2.0, 4.0, 6.0]), seed=2)
    b = torch.randn(6, dtype=F64)
    res = cg_solve(lambda v: A @ v, b, iters=6)
    assert bool(res.negative_curvature) and bool(res.indefinite)
    m = int(res.iters)
    ritz = res.ritz_values()
    assert len(ritz) == m + 1
    assert torch.allclose(ritz, _krylov_ritz(A, b, m + 1), rtol=1e-9, atol=1e-9)
    assert float(res.ritz_min) <= 0 and float(res.ritz_min) >= -3.0 - 1e-10
    assert torch.isnan(res.condition_estimate)


def test_breakdown_on_the_first_direction():
    A = torch.diag(torch.tensor([-1.0, -2.0], dtype=F64))
    res = cg_solve(lambda v: A @ v, torch.ones(2, dtype=F64), iters=3)
    assert int(res.iters) == 0 and bool(res.indefinite)
    assert float(res.ritz_min) == pytest.approx(-1.5)  # bᵀAb / bᵀb


def test_no_estimate_without_iterations():
    A = torch.eye(3, dtype=F64)
    for res in (
        cg_solve(lambda v: A @ v, torch.ones(3, dtype=F64), iters=0),
        cg_solve(lambda v: A @ v, torch.zeros(3, dtype=F64), iters=4),
        cg_layerwise_solve(lambda v: A @ v, torch.ones(3, dtype=F64), iters=3),
    ):
        assert torch.isnan(res.ritz_min) and torch.isnan(res.ritz_max)
        assert not bool(res.indefinite)


def test_nan_matvec_gives_nan_estimates_not_a_crash():
    res = cg_solve(lambda v: v * float("nan"), torch.ones(3, dtype=F64), iters=3)
    assert bool(res.nonfinite) and torch.isnan(res.ritz_min) and not bool(res.indefinite)


def test_tridiagonal_relation_on_hand_values():
    """T[j,j] = 1/α_j + β_{j−1}/α_{j−1}, T[j,j+1] = √β_j/α_j; a skipped suffix is not part of T."""
    alphas = torch.tensor([0.5, 0.25, 0.0], dtype=F64)
    betas = torch.tensor([4.0, 0.09, 0.0], dtype=F64)
    T = cg_tridiagonal(alphas, betas)
    assert T.valid.tolist() == [True, True, False]
    assert torch.allclose(T.diag[:2], torch.tensor([2.0, 4.0 + 8.0], dtype=F64))
    assert float(T.off[0]) == pytest.approx(4.0)
    dense = torch.tensor([[2.0, 4.0], [4.0, 12.0]], dtype=F64)
    assert torch.allclose(T.ritz_values(), torch.linalg.eigvalsh(dense))


def _forbid_sync(fn):
    calls = []
    orig_bool, orig_item = torch.Tensor.__bool__, torch.Tensor.item
    try:
        torch.Tensor.__bool__ = lambda self: calls.append("bool") or orig_bool(self)
        torch.Tensor.item = lambda self: calls.append("item") or orig_item(self)
        out = fn()
    finally:
        torch.Tensor.__bool__, torch.Tensor.item = orig_bool, orig_item
    return out, calls


@pytest.mark.parametrize("solve", [cg_solve, minres_solve])
def test_reading_estimates_on_cpu_makes_no_host_sync(solve):
    """The tridiagonal is built inside the solve with no sync; on CPU reading the extremes (eigvalsh
    on k×k) does not convert a tensor to Python either. (On CUDA eigvalsh synchronises: lazy.)"""
    A = _sym(torch.logspace(0, 1, 8))
    b = torch.randn(8, dtype=F64)
    res, calls = _forbid_sync(lambda: solve(lambda v: A @ v, b, iters=5))
    assert calls == []
    (lo, _, _, ind), calls = _forbid_sync(lambda: (res.ritz_min, res.ritz_max, res.condition_estimate, res.indefinite))
    assert calls == [] and lo.dim() == 0 and ind.dtype == torch.bool


def test_estimates_are_lazy_and_cached():
    A = _sym(torch.logspace(0, 1, 8))
    res = cg_solve(lambda v: A @ v, torch.randn(8, dtype=F64), iters=5)
    assert res._ritz is None
    first = res.ritz_min
    assert res._ritz is not None and res.ritz_min is first
