"""implicit_hypergrad against the dense IFT formula and a finite-difference bilevel derivative."""

from __future__ import annotations

import pytest
import torch

from bissl.hypergrad import implicit_hypergrad, reference_hypergrad, upper_gradient
from bissl.ops import flat_spec, flatten, unflatten
from bissl.ops.hvp import HVP_MODES
from bissl.solvers import SolverError
from bissl.testing import cnn_problem, dense_hessian, mlp_problem

F64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _dense_ift(prob, lam, damping):
    H = dense_hessian(prob.lower_loss, prob.params)
    _, v = upper_gradient(prob.upper_loss, prob.params)
    n = H.shape[0]
    return H, torch.linalg.solve(torch.eye(n, dtype=F64) + H / (lam + damping), v)


@pytest.mark.parametrize("make", [mlp_problem, cnn_problem], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("hvp_mode", HVP_MODES)
def test_matches_dense_formula(make, hvp_mode):
    prob = make()
    lam, damping = 0.5, 1.0
    H, expected = _dense_ift(prob, lam, damping)
    assert torch.linalg.eigvalsh(torch.eye(H.shape[0], dtype=F64) + H / (lam + damping)).min() > 0
    x = implicit_hypergrad(
        prob.lower_loss,
        prob.upper_loss,
        prob.params,
        lam=lam,
        damping=damping,
        iters=H.shape[0] + 10,
        hvp_mode=hvp_mode,
    )
    assert list(x) == list(prob.params)
    assert _rel(flatten(x), expected) <= 1e-6


def test_damping_zero_is_lambda_times_regularised_inverse():
    prob = mlp_problem()
    lam = 2.0
    H = dense_hessian(prob.lower_loss, prob.params)
    _, v = upper_gradient(prob.upper_loss, prob.params)
    n = H.shape[0]
    expected = lam * torch.linalg.solve(H + lam * torch.eye(n, dtype=F64), v)
    x = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=lam, iters=n + 10)
    assert _rel(flatten(x), expected) <= 1e-8


def test_ift_equals_finite_difference_of_the_lower_solution():
    """d/dφ L_D(θ*(φ)) by central differences of an exactly solved lower problem (float64)."""
    prob = mlp_problem(batch=6, dim=3, hidden=3)
    spec = flat_spec(prob.params)
    lam = 3.0  # strongly convex lower problem: θ*(φ) well defined, Newton converges
    phi0 = flatten(prob.params)

    def lower_solution(phi: torch.Tensor) -> torch.Tensor:
        theta = phi.clone()
        for _ in range(30):  # Newton on L_P(θ) + λ/2‖θ−φ‖²
            g = upper_gradient(prob.lower_loss, unflatten(theta, spec))[1] + lam * (theta - phi)
            H = dense_hessian(prob.lower_loss, unflatten(theta, spec)) + lam * torch.eye(len(theta), dtype=F64)
            theta = theta - torch.linalg.solve(H, g)
        return theta

    theta_star = lower_solution(phi0)
    x = implicit_hypergrad(prob.lower_loss, prob.upper_loss, unflatten(theta_star, spec), lam=lam, iters=60)
    d = torch.randn(len(phi0), dtype=F64)
    d /= d.norm()
    eps = 1e-5
    up = lambda th: prob.upper_loss(unflatten(th, spec))  # noqa: E731
    fd = (up(lower_solution(phi0 + eps * d)) - up(lower_solution(phi0 - eps * d))) / (2 * eps)
    assert abs(float(fd) - float(flatten(x) @ d)) <= 1e-7 * max(1.0, abs(float(fd)))


def test_reference_defaults_and_reference_loop_agree_on_a_cnn():
    """λ = 1e-3, damping 10, 5 iterations: ours (global CG) and the reference loop both solve the
    system; the reference's +1e-12 denominators cap its accuracy near ‖r‖² ≈ 1e-12, ours is exact."""
    prob = cnn_problem()
    _, expected = _dense_ift(prob, 1e-3, 10.0)
    ours = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=1e-3, damping=10.0, iters=5)
    ref = reference_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=1e-3, damping=10.0, iters=5)
    assert _rel(flatten(ours), expected) <= 1e-9
    assert _rel(flatten(ref), expected) <= 1e-5


def test_solvers_selectable_and_identity_is_the_upper_gradient():
    prob = mlp_problem()
    _, v = upper_gradient(prob.upper_loss, prob.params)
    x = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, solver="identity")
    assert torch.equal(flatten(x), v)
    _, expected = _dense_ift(prob, 1.0, 20.0)
    xn = implicit_hypergrad(
        prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, damping=20.0, iters=80, solver="neumann"
    )
    assert _rel(flatten(xn), expected) <= 1e-8


def test_indefinite_system_raises_by_default_and_reports_with_strict_false():
    prob = cnn_problem()
    H = dense_hessian(prob.lower_loss, prob.params)
    lowest = float(torch.linalg.eigvalsh(H).min())
    if lowest >= 0:
        pytest.skip("test problem unexpectedly convex")
    lam = abs(lowest) / 4  # I + H/lam has an eigenvalue 1 + lowest/lam = -3 < 0
    with pytest.raises(SolverError, match="negative curvature"):
        implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=lam, iters=40)
    x, info = implicit_hypergrad(
        prob.lower_loss, prob.upper_loss, prob.params, lam=lam, iters=40, strict=False, return_info=True
    )
    assert bool(info.negative_curvature) and torch.isfinite(flatten(x)).all()


def test_nan_loss_raises():
    prob = mlp_problem()
    nan_lower = lambda p: prob.lower_loss(p) * float("nan")  # noqa: E731
    with pytest.raises(SolverError, match="NaN"):
        implicit_hypergrad(nan_lower, prob.upper_loss, prob.params, lam=1.0, iters=3)


def test_bad_arguments():
    prob = mlp_problem()
    with pytest.raises(ValueError, match="lam"):
        implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=0.0)
    with pytest.raises(ValueError, match="damping"):
        implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, damping=-1.0)
    with pytest.raises(ValueError, match="unknown solver"):
        implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, solver="lsqr")
