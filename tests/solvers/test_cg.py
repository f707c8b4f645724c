"""CG (global and layer-wise), Neumann and identity against dense float64 solves; failure paths."""

from __future__ import annotations

import pytest
import torch

from bissl.ops import flatten, linearize_hvp, unflatten
from bissl.solvers import (
    SolverError,
    cg_layerwise_solve,
    cg_solve,
    get_solver,
    identity_solve,
    neumann_solve,
)
from bissl.testing import cnn_problem, dense_hessian, mlp_problem

F64 = torch.float64


def _spd(n: int, cond: float = 50.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=F64)
    return q @ torch.diag(eig) @ q.T


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [1, 7, 40])
def test_cg_matches_dense_solve_on_random_spd(n):
    A = _spd(n)
    b = torch.randn(n, dtype=F64)
    res = cg_solve(lambda v: A @ v, b, iters=3 * n + 5)
    assert _rel(res.x, torch.linalg.solve(A, b)) <= 1e-10
    assert bool(res.converged) and res.ok


def test_cg_scale_and_damping_solve_the_damped_system():
    A = _spd(12)
    b = torch.randn(12, dtype=F64)
    res = cg_solve(lambda v: A @ v, b, iters=40, scale=0.1, damping=2.0)
    expected = torch.linalg.solve(0.1 * A + 2.0 * torch.eye(12, dtype=F64), b)
    assert _rel(res.x, expected) <= 1e-10


def test_cg_on_dicts_returns_dicts_and_does_not_alias_b():
    A = _spd(5)
    b = {"w": torch.randn(2, 2, dtype=F64), "b": torch.randn(1, dtype=F64)}
    b_before = {k: t.clone() for k, t in b.items()}
    res = cg_solve(lambda d: unflatten(A @ flatten(d), _spec(b)), b, iters=20)
    assert set(res.x) == {"w", "b"} and res.x["w"].shape == (2, 2)
    assert _rel(flatten(res.x), torch.linalg.solve(A, flatten(b_before))) <= 1e-10
    for k in b:
        assert torch.equal(b[k], b_before[k])


def _spec(d):
    from bissl.ops import flat_spec

    return flat_spec(d)


def test_cg_on_real_model_hessian_plus_lambda():
    prob = cnn_problem()
    H = dense_hessian(prob.lower_loss, prob.params)
    lam = float(torch.linalg.eigvalsh(H).min().abs()) + 1.0  # H + lam I is SPD
    v = torch.randn(H.shape[0], dtype=F64)
    op = linearize_hvp(prob.lower_loss, prob.params)
    res = cg_solve(op, v, iters=200, damping=lam, rtol=1e-13)
    expected = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=F64), v)
    assert _rel(res.x, expected) <= 1e-8
    assert bool(res.converged) and int(res.iters) < 200


def test_extra_iterations_keep_the_converged_answer_without_nan():
    A = _spd(4)
    b = torch.randn(4, dtype=F64)
    res = cg_solve(lambda v: A @ v, b, iters=50)  # far more than n = 4
    assert torch.isfinite(res.x).all() and not bool(res.nonfinite)
    assert _rel(res.x, torch.linalg.solve(A, b)) <= 1e-12
    assert int(res.iters) <= 6


def test_exact_solution_at_start_is_not_a_breakdown():
    A = _spd(3)
    res = cg_solve(lambda v: A @ v, torch.zeros(3, dtype=F64), iters=5, strict=True)
    assert torch.equal(res.x, torch.zeros(3, dtype=F64)) and int(res.iters) == 0


def test_negative_curvature_is_flagged_and_raised():
    A = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64))
    b = torch.ones(3, dtype=F64)
    res = cg_solve(lambda v: A @ v, b, iters=5)
    assert bool(res.negative_curvature) and not res.ok
    with pytest.raises(SolverError, match="negative curvature"):
        cg_solve(lambda v: A @ v, b, iters=5, strict=True)


def test_nan_in_matvec_is_flagged_and_raised_never_zeroed():
    b = torch.ones(4, dtype=F64)
    res = cg_solve(lambda v: v * float("nan"), b, iters=3)
    assert bool(res.nonfinite) and "NaN" in res.problems()[0]
    with pytest.raises(SolverError, match="NaN"):
        cg_solve(lambda v: v * float("nan"), b, iters=3, strict=True)


def test_non_convergence_raised_only_when_a_tolerance_was_asked():
    A = _spd(30, cond=1e4)
    b = torch.randn(30, dtype=F64)
    assert cg_solve(lambda v: A @ v, b, iters=3, strict=True).iters == 3  # fixed budget: fine
    with pytest.raises(SolverError, match="no convergence"):
        cg_solve(lambda v: A @ v, b, iters=3, rtol=1e-10, strict=True)


def test_fixed_iteration_mode_makes_no_host_sync():
    """No .item()/bool() on device values: checked by making any conversion raise."""
    A = _spd(6)
    b = torch.randn(6, dtype=F64)

    class NoSync(torch.Tensor):
        pass

    calls = []
    orig_bool, orig_item = torch.Tensor.__bool__, torch.Tensor.item
    try:
        torch.Tensor.__bool__ = lambda self: calls.append("bool") or orig_bool(self)
        torch.Tensor.item = lambda self: calls.append("item") or orig_item(self)
        cg_solve(lambda v: A @ v, b, iters=4)
        assert calls == []
        cg_solve(lambda v: A @ v, b, iters=4, rtol=1e-3)
        assert calls, "tolerance mode is expected to sync to stop early"
    finally:
        torch.Tensor.__bool__, torch.Tensor.item = orig_bool, orig_item


def test_cg_rejects_bad_input():
    A = _spd(3)
    with pytest.raises(ValueError, match="flat"):
        cg_solve(lambda v: v, torch.ones(2, 2), iters=2)
    with pytest.raises(ValueError, match="matvec returned"):
        cg_solve(lambda v: v[:2], torch.ones(3), iters=2)
    with pytest.raises(ValueError, match="iters"):
        cg_solve(lambda v: A @ v, torch.ones(3, dtype=F64), iters=-1)
    with pytest.raises(ValueError, match="unknown solver"):
        get_solver("gmres")


def test_layerwise_cg_single_block_equals_global_cg():
    A = _spd(10)
    b = torch.randn(10, dtype=F64)
    lw = cg_layerwise_solve(lambda v: A @ v, b, iters=6)
    gl = cg_solve(lambda v: A @ v, b, iters=6)
    assert _rel(lw.x, gl.x) <= 1e-12


def test_layerwise_cg_matches_the_reference_loop_on_a_model():
    """Per-tensor α/β exactly as the reference code's layer-wise CG."""
    from bissl.hypergrad import implicit_hypergrad, reference_hypergrad

    prob = mlp_problem()
    ours = implicit_hypergrad(
        prob.lower_loss,
        prob.upper_loss,
        prob.params,
        lam=0.5,
        damping=0.0,
        iters=4,
        solver="cg_layerwise",
        strict=False,
    )
    ref = reference_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=0.5, iters=4, layerwise=True)
    # The reference adds 1e-12 to its denominators; that alone moves x by ~1e-9 here.
    assert _rel(flatten(ours), flatten(ref)) <= 1e-7


def test_layerwise_cg_is_not_convergent_unlike_global_cg():
    """docs/method.md §3: layer-wise CG stays far from the solution where global CG converges."""
    prob = mlp_problem()
    H = dense_hessian(prob.lower_loss, prob.params)
    lam = float(torch.linalg.eigvalsh(H).min().abs()) + 0.05
    A = H + lam * torch.eye(H.shape[0], dtype=F64)
    b = torch.randn(H.shape[0], dtype=F64)
    exact = torch.linalg.solve(A, b)
    segments = _spec(prob.params).segment_ids()
    lw = cg_layerwise_solve(lambda v: A @ v, b, iters=30, segments=segments)
    gl = cg_solve(lambda v: A @ v, b, iters=30)
    assert _rel(gl.x, exact) <= 1e-6
    assert _rel(lw.x, exact) > 1e-3


def test_neumann_converges_when_spectral_radius_below_one():
    A = _spd(8, cond=5.0)
    c = 10.0  # (I + A/c): ‖A‖/c = 0.5 < 1
    b = torch.randn(8, dtype=F64)
    res = neumann_solve(lambda v: A @ v, b, iters=60, scale=1 / c, damping=1.0)
    expected = torch.linalg.solve(torch.eye(8, dtype=F64) + A / c, b)
    assert _rel(res.x, expected) <= 1e-12


def test_neumann_k_terms_equal_the_series():
    A = _spd(5, cond=3.0) / 5
    b = torch.randn(5, dtype=F64)
    res = neumann_solve(lambda v: A @ v, b, iters=3, damping=1.0, step=1.0)
    M = torch.eye(5, dtype=F64) + A
    series = sum(torch.linalg.matrix_power(torch.eye(5, dtype=F64) - M, k) @ b for k in range(3))
    assert _rel(res.x, series) <= 1e-13


def test_identity_is_first_order():
    b = {"w": torch.randn(3, dtype=F64)}
    res = identity_solve(None, b, damping=1.0)
    assert torch.equal(res.x["w"], b["w"])
    assert torch.equal(identity_solve(None, b, damping=4.0).x["w"], b["w"] / 4.0)
