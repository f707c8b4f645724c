"""implicit_hypergrad's on_indefinite policies × strict on a model whose I + H/λ is indefinite."""

from __future__ import annotations

import warnings

import pytest
import torch

from bissl.hypergrad import ON_INDEFINITE, implicit_hypergrad, upper_gradient
from bissl.ops import flatten
from bissl.solvers import IndefiniteSystemWarning, SolverError
from bissl.testing import dense_hessian, mlp_problem

F64 = torch.float64


@pytest.fixture(scope="module")
def indefinite():
    """The tiny MLP's NT-Xent Hessian has λ_min < 0; λ = |λ_min|/4 puts 1 + λ_min/λ = −3 in I + H/λ."""
    prob = mlp_problem()
    H = dense_hessian(prob.lower_loss, prob.params)
    lowest = float(torch.linalg.eigvalsh(H)[0])
    assert lowest < 0, "test problem must have a non-convex lower loss"
    _, v = upper_gradient(prob.upper_loss, prob.params)
    return prob, H, v, abs(lowest) / 4


def _system(H, lam, damping):
    return torch.eye(H.shape[0], dtype=F64) + H / (lam + damping)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _call(prob, lam, **kw):
    return implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=lam, return_info=True, **kw)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("policy", ON_INDEFINITE)
def test_indefinite_system_never_yields_an_unflagged_answer(indefinite, policy, strict):
    """Every policy either raises, or returns an answer whose info says the system was indefinite
    and what was done; a remedied answer must be right for the system it says it solved."""
    prob, H, _, lam = indefinite
    assert torch.linalg.eigvalsh(_system(H, lam, 0.0))[0] < 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IndefiniteSystemWarning)
        try:
            _, info = _call(prob, lam, iters=5, on_indefinite=policy, strict=strict)
        except SolverError as err:
            assert policy == "raise" and strict, f"{policy} should not raise: {err}"
            assert "indefinite" in str(err) and "negative curvature" in str(err)
            return
    assert not (policy == "raise" and strict), "the default policy must raise"
    summary = info.summary()
    assert summary["indefinite"], "an indefinite system was returned without the indefinite flag"
    expected_action = {
        "raise": "none",
        "warn": "warned",
        "fallback": "fallback:minres",
        "adaptive_damping": "adaptive_damping",
    }[policy]
    assert summary["action"] == expected_action
    if policy in ("raise", "warn"):  # CG's answer kept: its own flags must condemn it
        assert bool(info.negative_curvature) and info.problems()
    if policy == "fallback":
        assert info.method == "minres" and info.initial is not None and bool(info.initial.indefinite)
    if policy == "adaptive_damping":
        assert summary["damping_used"] > 0
        assert torch.linalg.eigvalsh(_system(H, lam, summary["damping_used"]))[0] > 0
        assert not info.problems()


def test_report_only_mode_returns_flags_without_host_sync(indefinite):
    prob, _, _, lam = indefinite
    _call(prob, lam, iters=5, strict=False)  # warm-up: first-call set-up may sync
    op_calls = []
    orig_bool, orig_item = torch.Tensor.__bool__, torch.Tensor.item
    try:
        torch.Tensor.__bool__ = lambda self: op_calls.append("bool") or orig_bool(self)
        torch.Tensor.item = lambda self: op_calls.append("item") or orig_item(self)
        _, info = _call(prob, lam, iters=5, strict=False)
    finally:
        torch.Tensor.__bool__, torch.Tensor.item = orig_bool, orig_item
    assert op_calls == []
    assert info.action == "none" and bool(info.indefinite) and bool(info.negative_curvature)


def test_fallback_minres_solves_the_indefinite_system_exactly(indefinite):
    prob, H, v, lam = indefinite
    exact = torch.linalg.solve(_system(H, lam, 0.0), v)
    x, info = _call(prob, lam, iters=80, on_indefinite="fallback")
    assert _rel(flatten(x), exact) <= 1e-9
    assert info.action == "fallback:minres" and float(info.ritz_min) < 0


def test_fallback_identity_is_first_order(indefinite):
    prob, _, v, lam = indefinite
    x, info = _call(prob, lam, iters=5, on_indefinite="fallback", fallback="identity")
    assert torch.equal(flatten(x), v) and info.action == "fallback:identity"


def test_adaptive_damping_solves_the_damped_system_it_reports(indefinite):
    prob, H, v, lam = indefinite
    x, info = _call(prob, lam, iters=120, on_indefinite="adaptive_damping")
    d = info.damping_used
    M = _system(H, lam, d)
    assert torch.linalg.eigvalsh(M)[0] > 0
    assert _rel(flatten(x), torch.linalg.solve(M, v)) <= 1e-9
    # One re-solve: λ + d = 2·|Ritz estimate of λ_min(H)| ≤ 2·|λ_min(H)| (the estimate is an inner one).
    assert lam + d <= 2 * abs(float(torch.linalg.eigvalsh(H)[0])) * (1 + 1e-9)
    assert info.initial is not None and bool(info.initial.negative_curvature)


def test_warn_policy_warns_and_keeps_the_cg_answer(indefinite):
    prob, _, _, lam = indefinite
    with pytest.warns(IndefiniteSystemWarning, match="indefinite"):
        x, info = _call(prob, lam, iters=5, on_indefinite="warn")
    plain, _ = _call(prob, lam, iters=5, strict=False)
    assert torch.equal(flatten(x), flatten(plain)) and info.action == "warned"


def test_minres_solver_needs_no_policy(indefinite):
    prob, H, v, lam = indefinite
    x, info = _call(prob, lam, iters=80, solver="minres")  # strict, on_indefinite="raise"
    assert _rel(flatten(x), torch.linalg.solve(_system(H, lam, 0.0), v)) <= 1e-9
    assert info.action == "none" and info.summary()["indefinite"]


@pytest.mark.parametrize("policy", ON_INDEFINITE)
def test_positive_definite_system_is_left_alone(indefinite, policy):
    prob, H, _, lam = indefinite
    damping = 4 * lam  # 1 + λ_min/(5λ/4·4) > 0
    assert torch.linalg.eigvalsh(_system(H, lam, damping))[0] > 0
    x, info = _call(prob, lam, damping=damping, iters=5, on_indefinite=policy)
    ref, _ = _call(prob, lam, damping=damping, iters=5)
    assert info.action == "none" and info.damping_used == damping
    assert torch.equal(flatten(x), flatten(ref))
    assert float(info.ritz_min) > 0 and float(info.condition_estimate) >= 1


def test_bad_policy_arguments(indefinite):
    prob, _, _, lam = indefinite
    with pytest.raises(ValueError, match="on_indefinite"):
        _call(prob, lam, on_indefinite="ignore")
    with pytest.raises(ValueError, match="unknown solver"):
        _call(prob, lam, on_indefinite="fallback", fallback="gmres")
    with pytest.raises(ValueError, match="must differ"):
        _call(prob, lam, solver="minres", on_indefinite="fallback", fallback="minres")
