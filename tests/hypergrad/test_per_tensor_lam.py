"""Per-tensor λ: ``x = C (H + C)⁻¹ v`` with ``C = diag(λ_i + damping)``, checked against a dense
float64 solve, a finite difference of the exactly solved lower problem, and the scalar path."""

from __future__ import annotations

import pytest
import torch

from bissl.distributed.hypergrad import distributed_implicit_hypergrad
from bissl.hypergrad import HypergradSettings, implicit_hypergrad, upper_gradient
from bissl.ops import flat_spec, flatten, unflatten
from bissl.testing import cnn_problem, dense_hessian, mlp_problem

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _lams(params: dict[str, torch.Tensor]) -> dict[str, float]:
    """Distinct weights, spread over three decades, one per tensor."""
    return {k: 0.1 * 3.0**i for i, k in enumerate(params)}


@pytest.fixture(scope="module")
def cnn():
    """The GroupNorm CNN problem (210 parameters, 7 tensors), its dense Hessian and ``v``."""
    prob = cnn_problem(norm="group")
    return prob, dense_hessian(prob.lower_loss, prob.params), upper_gradient(prob.upper_loss, prob.params)[1]


def _entrywise(params: dict[str, torch.Tensor], lams: dict[str, float], damping: float) -> torch.Tensor:
    return torch.cat([torch.full((p.numel(),), lams[k] + damping, dtype=F64) for k, p in params.items()])


@pytest.mark.parametrize("form", ["dict", "tuple", "flat_seq"])
@pytest.mark.parametrize("solver", ["cg", "minres"])
@pytest.mark.parametrize("hvp_mode", ["revrev", "fwdrev"])
def test_matches_dense_per_tensor_formula(cnn, form, solver, hvp_mode):
    prob, H, v = cnn
    lams, damping = _lams(prob.params), 0.2
    c = _entrywise(prob.params, lams, damping)
    assert torch.linalg.eigvalsh(H + torch.diag(c)).min() > 0
    expected = c * torch.linalg.solve(H + torch.diag(c), v)
    lam = lams if form == "dict" else (tuple(lams.values()) if form == "tuple" else torch.tensor(list(lams.values())))
    x = implicit_hypergrad(
        prob.lower_loss,
        prob.upper_loss,
        prob.params,
        lam=lam,
        damping=damping,
        iters=2 * H.shape[0],
        solver=solver,
        hvp_mode=hvp_mode,
        rtol=1e-13,
    )
    assert _rel(flatten(x), expected) <= 1e-8
    # The per-tensor answer really differs from any single λ's (the test can tell them apart).
    single = torch.linalg.solve(torch.eye(len(v), dtype=F64) + H / (sum(lams.values()) / len(lams) + damping), v)
    assert _rel(single, expected) > 1e-2


def test_equals_the_finite_difference_of_the_lower_solution():
    """d/dφ L_D(θ*(φ)) for θ*(φ) = argmin L_P(θ) + ½ Σ_i λ_i‖θ_i − φ_i‖², central differences."""
    prob = mlp_problem(batch=6, dim=3, hidden=3)
    spec = flat_spec(prob.params)
    lams = {k: 2.0 + 2.0 * i for i, k in enumerate(prob.params)}  # strongly convex lower problem
    lam_vec = _entrywise(prob.params, lams, 0.0)
    phi0 = flatten(prob.params)

    def lower_solution(phi: torch.Tensor) -> torch.Tensor:
        theta = phi.clone()
        for _ in range(30):  # Newton
            g = upper_gradient(prob.lower_loss, unflatten(theta, spec))[1] + lam_vec * (theta - phi)
            H = dense_hessian(prob.lower_loss, unflatten(theta, spec)) + torch.diag(lam_vec)
            theta = theta - torch.linalg.solve(H, g)
        return theta

    theta_star = lower_solution(phi0)
    x = implicit_hypergrad(prob.lower_loss, prob.upper_loss, unflatten(theta_star, spec), lam=lams, iters=80)
    up = lambda th: prob.upper_loss(unflatten(th, spec))  # noqa: E731
    eps = 1e-5
    for seed in range(3):
        d = torch.randn(len(phi0), dtype=F64, generator=torch.Generator().manual_seed(seed))
        d /= d.norm()
        fd = (up(lower_solution(phi0 + eps * d)) - up(lower_solution(phi0 - eps * d))) / (2 * eps)
        assert abs(float(fd) - float(flatten(x) @ d)) <= 1e-7 * max(1.0, abs(float(fd)))


def test_equal_weights_are_the_scalar_path_and_identity_is_first_order():
    prob = mlp_problem()
    n = sum(p.numel() for p in prob.params.values())
    kw = dict(damping=1.5, iters=n + 10)
    scalar = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=0.7, **kw)
    per = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=[0.7] * len(prob.params), **kw)
    assert _rel(flatten(per), flatten(scalar)) <= 1e-10
    _, v = upper_gradient(prob.upper_loss, prob.params)
    ident = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=_lams(prob.params), solver="identity")
    torch.testing.assert_close(flatten(ident), v, rtol=1e-14, atol=0)


def test_through_the_distributed_space_on_one_rank():
    """The rank-averaged and the partitioned spaces: the scaling in the solver's layout."""
    prob = cnn_problem(norm="group")
    lams = _lams(prob.params)
    settings = HypergradSettings(iters=30, damping=3.0)
    want = flatten(implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=lams, **settings.kwargs()))
    for shard in (False, True):
        got = distributed_implicit_hypergrad(
            prob.lower_loss, prob.upper_loss, prob.params, lam=lams, settings=settings, shard=shard
        )
        assert _rel(flatten(got), want) <= 1e-10


def test_per_tensor_lam_errors_name_the_problem():
    prob = mlp_problem()
    args = (prob.lower_loss, prob.upper_loss, prob.params)
    names = list(prob.params)
    with pytest.raises(ValueError, match=f"has 2 values but θ has {len(names)} tensors"):
        implicit_hypergrad(*args, lam=[1.0, 2.0])
    with pytest.raises(ValueError, match="unknown \\['nope'\\]"):
        implicit_hypergrad(*args, lam={**dict.fromkeys(names, 1.0), "nope": 1.0})
    with pytest.raises(ValueError, match=f"missing \\[{names[0]!r}\\]"):
        implicit_hypergrad(*args, lam=dict.fromkeys(names[1:], 1.0))
    with pytest.raises(ValueError, match=f"lam of tensor {names[1]!r} must be finite and > 0"):
        implicit_hypergrad(*args, lam=[1.0, 0.0, *[1.0] * (len(names) - 2)])
    with pytest.raises(ValueError, match="adaptive_damping' needs a single lam"):
        implicit_hypergrad(*args, lam=[1.0] * len(names), damping=1.0, on_indefinite="adaptive_damping")
