"""argmin / custom_argmin against the dense IFT formula, BiSSL's hypergradient and finite differences."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from bissl import argmin, custom_argmin
from bissl.hypergrad import implicit_hypergrad, reference_hypergrad
from bissl.ops import flat_spec, flatten, unflatten
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.hvp import HVP_MODES
from bissl.solvers import SolverError
from bissl.testing import cnn_problem, dense_hessian, mlp_problem

F64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _dense_ift(objective, theta_flat, etas, g):
    """``[−(∂_η ∇_θF)ᵀ (∇²_θθ F)⁻¹ g for η in etas]`` by dense Hessian and Jacobian (float64)."""
    with batchnorm_stats_frozen():
        A = torch.autograd.functional.hessian(lambda t: objective(t, *etas), theta_flat)
        w = torch.linalg.solve(A, g)
        out = []
        for j, eta in enumerate(etas):

            def grad_theta(e, j=j):
                args = list(etas)
                args[j] = e
                t = theta_flat.detach().requires_grad_(True)
                return torch.autograd.grad(objective(t, *args), t, create_graph=True)[0]

            jac = torch.autograd.functional.jacobian(grad_theta, eta.detach())  # (P, *eta.shape)
            out.append(-(jac.reshape(len(theta_flat), -1).T @ w).reshape(eta.shape))
    return A, out


def _general_problem(make):
    """``F(θ, φ, s) = L_P(θ) + softplus(s)/2 · ‖θ − φ‖²``: φ and the weight s both shape θ*."""
    prob = make()
    spec = flat_spec(prob.params)
    phi0 = flatten(prob.params).detach() + 0.1 * torch.randn(spec.numel, dtype=F64)
    s0 = torch.tensor(3.0, dtype=F64)  # softplus(3) ≈ 3.05 > −λ_min(∇²L_P): F strongly convex

    def objective(theta, phi, s):
        theta_d = theta if isinstance(theta, dict) else unflatten(theta, spec)
        theta_f = flatten(theta_d, spec) if isinstance(theta, dict) else theta
        phi_f = flatten(phi, spec) if isinstance(phi, dict) else phi
        return prob.lower_loss(theta_d) + F.softplus(s) / 2 * (theta_f - phi_f).square().sum()

    return prob, spec, phi0, s0, objective


def small_mlp():
    return mlp_problem(batch=6, dim=3, hidden=3)  # 24 parameters: exact solves stay cheap


CASES = [(small_mlp, mode, "cg", "dict") for mode in HVP_MODES] + [
    (small_mlp, "revrev", "minres", "tensor"),
    (small_mlp, "fwdrev", "cg", "tensor"),
]


@pytest.mark.parametrize(
    "make, hvp_mode, solver, form", CASES, ids=[f"{m.__name__}-{h}-{s}-{f}" for m, h, s, f in CASES]
)
def test_matches_dense_ift_formula(make, hvp_mode, solver, form):
    prob, spec, phi0, s0, objective = _general_problem(make)
    theta_hat = flatten(prob.params).detach()
    A, (want_phi, want_s) = _dense_ift(objective, theta_hat, [phi0, s0], _upper_grad(prob, theta_hat, spec))
    if solver == "cg":
        assert torch.linalg.eigvalsh(A).min() > 0, "test problem must be positive definite for CG"

    phi = phi0.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    if form == "dict":
        phi_arg = {k: t.clone().requires_grad_(True) for k, t in unflatten(phi0, spec).items()}
        star = argmin(
            objective, unflatten(theta_hat, spec), phi_arg, s, solver=solver, iters=spec.numel + 10, hvp_mode=hvp_mode
        )
        assert isinstance(star, dict) and list(star) == list(spec.names)
        prob.upper_loss(star).backward()
        got_phi = flatten({k: t.grad for k, t in phi_arg.items()}, spec)
    else:
        star = argmin(objective, theta_hat, phi, s, solver=solver, iters=spec.numel + 10, hvp_mode=hvp_mode)
        assert isinstance(star, torch.Tensor) and torch.equal(star, theta_hat)
        prob.upper_loss(unflatten(star, spec)).backward()
        got_phi = phi.grad
    assert _rel(got_phi, want_phi) <= 1e-6
    assert abs(float(s.grad - want_s)) <= 1e-6 * abs(float(want_s))


def test_batchnorm_running_statistics_untouched():
    """The HVPs and the cross term of the backward pass use batch statistics and leave the
    running buffers alone (the HVP BatchNorm policy, bissl.ops.batchnorm)."""
    prob, spec, phi0, s0, objective = _general_problem(lambda: cnn_problem(batch=4, size=4, width=2))
    phi, s = phi0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    star = argmin(objective, flatten(prob.params), phi, s, iters=3, solver="minres")
    upper = prob.upper_loss(unflatten(star, spec))  # this train-mode forward moves the buffers
    buffers = {k: b.clone() for k, b in prob.backbone.named_buffers()}
    upper.backward()
    assert torch.isfinite(phi.grad).all() and torch.isfinite(s.grad)
    for k, b in prob.backbone.named_buffers():
        assert torch.equal(b, buffers[k]), k


def _upper_grad(prob, theta_flat, spec):
    t = theta_flat.clone().requires_grad_(True)
    return torch.autograd.grad(prob.upper_loss(unflatten(t, spec)), t)[0]


@pytest.mark.parametrize("damping", [0.0, 10.0])
@pytest.mark.parametrize("iters", [5, 30])
def test_bissl_proximal_problem_is_a_special_case(damping, iters):
    """F = L_P(θ) + λ/2‖θ − φ‖²: φ gets λ(H + (λ+d)I)⁻¹v = λ/(λ+d) · implicit_hypergrad's x (the
    same Krylov iterates, so equal after any number of iterations), and the reference loop's x."""
    prob = small_mlp()
    lam = 4.0
    assert torch.linalg.eigvalsh(dense_hessian(prob.lower_loss, prob.params)).min() > -lam
    phi = {k: (t + 0.05).clone().requires_grad_(True) for k, t in prob.params.items()}
    head = prob.modules["head"]
    gamma = 0.3

    def objective(theta, phi):
        return prob.lower_loss(theta) + lam / 2 * sum((theta[k] - phi[k]).square().sum() for k in theta)

    star = argmin(objective, prob.params, phi, iters=iters, damping=damping)
    (prob.upper_loss(star) + gamma * prob.upper_loss(phi)).backward()

    x = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=lam, damping=damping, iters=iters)
    x_ref = reference_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=lam, damping=damping, iters=iters)
    leaves = {k: t.detach().requires_grad_(True) for k, t in phi.items()}
    direct = dict(zip(leaves, torch.autograd.grad(prob.upper_loss(leaves), tuple(leaves.values()))))
    got = flatten({k: phi[k].grad - gamma * direct[k] for k in phi})
    assert _rel(got, lam / (lam + damping) * flatten(x)) <= 1e-9
    # The reference's +1e-12 CG denominators move its answer by up to ~1e-6 relative (docs/method.md).
    assert _rel(got, lam / (lam + damping) * flatten(x_ref)) <= 1e-5
    # The head is not in F: its gradient is the ordinary one of both upper terms.
    head_grads = torch.autograd.grad(
        prob.upper_loss(prob.params) + gamma * prob.upper_loss(leaves), tuple(head.parameters())
    )
    for p, want in zip(head.parameters(), head_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=0)


def _logistic_data(n=40, d=4):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = (X @ torch.randn(d, generator=g, dtype=F64) + 0.3 * torch.randn(n, generator=g, dtype=F64) > 0).to(F64)
    return X, y


def test_dict_theta_and_dict_hyperparameters_match_finite_differences():
    """θ = {w, b}; η = {per-feature log L2 weights, prior centre}: the IFT gradient of a validation
    loss at an exact minimiser equals central differences of re-solved minimisers (float64)."""
    X, y = _logistic_data()
    Xv, yv = _logistic_data(30)

    def objective(theta, hyper):
        penalty = (hyper["log_l2"].exp() * (theta["w"] - hyper["centre"]).square()).sum() / 2
        return F.binary_cross_entropy_with_logits(X @ theta["w"] + theta["b"], y) + penalty

    def newton(hyper):
        spec = flat_spec({"w": X.new_zeros(4), "b": X.new_zeros(())})
        t = torch.zeros(spec.numel, dtype=F64)
        flat_obj = lambda t: objective(unflatten(t, spec), hyper)  # noqa: E731
        for _ in range(30):
            t = t - torch.linalg.solve(torch.func.hessian(flat_obj)(t), torch.func.grad(flat_obj)(t))
        return unflatten(t, spec)

    def val(theta):
        return F.binary_cross_entropy_with_logits(Xv @ theta["w"] + theta["b"], yv)

    hyper = {
        "log_l2": torch.tensor([-1.0, 0.0, 0.5, -2.0], dtype=F64, requires_grad=True),
        "centre": torch.tensor([0.2, -0.1, 0.0, 0.3], dtype=F64, requires_grad=True),
    }
    seen = []

    @custom_argmin(objective, iters=10, on_solve=seen.append)
    def fit(hyper):
        assert not any(t.requires_grad for t in hyper.values()), "fit must get detached arguments"
        return newton(hyper)

    val(fit(hyper)).backward()
    assert len(seen) == 1 and bool(seen[0].converged)
    eps = 1e-5
    for key in hyper:
        d = torch.randn(4, dtype=F64)
        plus = {k: (v + eps * d if k == key else v).detach() for k, v in hyper.items()}
        minus = {k: (v - eps * d if k == key else v).detach() for k, v in hyper.items()}
        fd = (val(newton(plus)) - val(newton(minus))) / (2 * eps)
        assert abs(float(hyper[key].grad @ d - fd)) <= 1e-7 * max(1.0, abs(float(fd)))


def _indefinite_problem():
    """F(θ, η) = ½θᵀMθ − ηᵀθ with M symmetric indefinite and nonsingular: θ* = M⁻¹η is a saddle."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    M = Q @ torch.diag(torch.tensor([-2.0, -0.5, 0.7, 1.0, 3.0, 4.0], dtype=F64)) @ Q.T
    eta = torch.randn(6, generator=g, dtype=F64)
    objective = lambda th, e: 0.5 * th @ M @ th - e @ th  # noqa: E731
    return M, eta, objective


def test_indefinite_hessian_raises_by_default_and_minres_fallback_is_exact():
    M, eta0, objective = _indefinite_problem()
    theta = torch.linalg.solve(M, eta0)
    c = torch.arange(1.0, 7.0, dtype=F64)
    eta = eta0.clone().requires_grad_(True)
    with pytest.raises(SolverError, match=r"indefinite|negative curvature"):
        (c @ argmin(objective, theta, eta, iters=12)).backward()
    infos = []
    eta = eta0.clone().requires_grad_(True)
    (c @ argmin(objective, theta, eta, iters=12, on_indefinite="fallback", on_solve=infos.append)).backward()
    # dθ*/dη = M⁻¹: the gradient of c·θ* is M⁻¹c.
    assert _rel(eta.grad, torch.linalg.solve(M, c)) <= 1e-8
    assert infos[0].action == "fallback:minres"
    eta = eta0.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (c @ argmin(objective, theta, eta, iters=12, strict=False)).backward()  # report only
    assert not caught and eta.grad is not None


def test_adaptive_damping_solves_a_more_damped_system():
    M, eta0, objective = _indefinite_problem()
    theta = torch.linalg.solve(M, eta0)
    c = torch.arange(1.0, 7.0, dtype=F64)
    infos = []
    eta = eta0.clone().requires_grad_(True)
    (
        c
        @ argmin(objective, theta, eta, iters=12, damping=0.1, on_indefinite="adaptive_damping", on_solve=infos.append)
    ).backward()
    d = infos[0].damping_used
    assert infos[0].action == "adaptive_damping" and d > 2.0  # past −λ_min(M) = 2
    assert _rel(eta.grad, torch.linalg.solve(M + d * torch.eye(6, dtype=F64), c)) <= 1e-8
    with pytest.raises(ValueError, match=r"adaptive_damping.*positive damping"):
        argmin(objective, theta, eta, on_indefinite="adaptive_damping")


def test_only_arguments_are_differentiated_and_the_solution_is_a_copy():
    X, y = _logistic_data()
    closed = torch.tensor(0.7, dtype=F64, requires_grad=True)  # captured, not passed: a constant
    l2 = torch.tensor(0.5, dtype=F64, requires_grad=True)
    head = torch.tensor(2.0, dtype=F64, requires_grad=True)  # used by the upper loss only

    def objective(w, l2):
        return F.binary_cross_entropy_with_logits(closed * (X @ w), y) + l2 / 2 * w.square().sum()

    w_hat = torch.zeros(4, dtype=F64)
    star_obj = lambda w, l2, X, note: objective(w, l2)  # noqa: E731
    star = argmin(star_obj, w_hat, l2, X, "a non-tensor argument is passed through")
    assert star.data_ptr() != w_hat.data_ptr()
    (head * star.sum()).backward()
    assert closed.grad is None
    assert l2.grad is not None and head.grad is not None
    torch.testing.assert_close(head.grad, w_hat.sum())


def test_bad_options_fail_at_call_time():
    w = torch.zeros(3, dtype=F64)
    l2 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    obj = lambda w, l2: l2 * w.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="unknown solver"):
        argmin(obj, w, l2, solver="lbfgs")
    with pytest.raises(ValueError, match="unknown HVP mode"):
        argmin(obj, w, l2, hvp_mode="jvp")
    with pytest.raises(ValueError, match="iters"):
        argmin(obj, w, l2, iters=0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        custom_argmin(obj, damping=-1.0)
    with pytest.raises(TypeError, match="floating point"):
        argmin(obj, torch.zeros(3, dtype=torch.long), l2)
