"""The generalized upper-level gradients and adaptive λ, each against its formula on the tiny CNN.

Every test replays one BiSSL step on a deep copy of the phase (same state, same generators, so
the same batches and augmentations) and computes the expected gradient independently.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from bissl.config import ConfigError
from bissl.hypergrad import implicit_hypergrad
from bissl.hypergrad.lam_schedules import (
    ConstantLam,
    DistanceLam,
    GradRatioLam,
    GradRatioPerTensorLam,
    LowerStepStats,
    build_lam_schedule,
)
from bissl.ops import batchnorm_stats_frozen
from bissl.tasks.downstream import classification_loss
from bissl.trainer.bissl_phase import BisslPhase
from bissl.trainer.experiment import load_pipeline_data
from bissl.trainer.loop import RunContext
from bissl.trainer.pretext_phase import PretextPhase
from bissl.trainer.rng import seed_everything


@pytest.fixture(scope="module")
def data():
    from bissl.config import Config

    return load_pipeline_data(Config())


def _ctx() -> RunContext:
    return RunContext(seed=0, device=torch.device("cpu"), ckpt_dir=None, metrics=None)


def _steps(phase, n):
    return [row for _ in range(n) for row in phase.step()]


def _bissl(cfg, data) -> BisslPhase:
    seed_everything(0)
    pre = PretextPhase("pretext", cfg, data, _ctx())
    _steps(pre, pre.total_steps)
    seed_everything(1)
    return BisslPhase(cfg, data, _ctx(), pre.result())


def _upper_terms(twin: BisslPhase, lam: float):
    """Independent pieces of one upper step on ``twin``: the CG solution x of the step's system,
    ∇_θ L_D(θ) and ∇_ψ L_D(θ), ∇_φ L_D(φ) and ∇_ψ L_D(φ), θ and φ as flat-per-tensor lists."""
    views = twin.batches.hvp_views(0)
    idx = twin.batches.upper_sampler.next_batch()
    data = twin.batches.data
    x, y = twin.batches.down_aug(data.train_x[idx], twin.batches.upper_gen), data.train_y[idx]
    for m in (twin.theta_net, twin.pretext, twin.phi_net, twin.head):
        m.train()
    theta = {n: p.detach() for n, p in twin.theta_net.named_parameters()}
    heads = list(twin.head.parameters())

    def lower_loss(t):
        return twin.pretext.loss(lambda *a, **k: functional_call(twin.theta_net, t, a, k), *views)

    def upper_loss(t):
        with batchnorm_stats_frozen():
            return classification_loss(twin.head(functional_call(twin.theta_net, t, (x,))), y)

    # The step's own solver settings (built once from the config): same solver, damping and
    # indefiniteness policy (default: MINRES re-solves a flagged system).
    xs = implicit_hypergrad(lower_loss, upper_loss, theta, lam=lam, **twin.settings.hyper.kwargs())
    t_req = {n: p.detach().requires_grad_() for n, p in theta.items()}
    g_theta = torch.autograd.grad(upper_loss(t_req), list(t_req.values()) + heads)
    l_phi = classification_loss(twin.head(twin.phi_net(x)), y)
    g_phi = torch.autograd.grad(l_phi, twin.phi_params + heads)
    n = len(twin.phi_params)
    return {
        "x": list(xs.values()),
        "gt": g_theta[:n],
        "gt_head": g_theta[n:],
        "gp": g_phi[:n],
        "gp_head": g_phi[n:],
        "theta": list(theta.values()),
        "phi": [p.detach().clone() for p in twin.phi_params],
    }


def _after_lower_step(tiny_config, data, *overrides):
    cfg = tiny_config(
        "bissl.clip_norm=1e9",
        "bissl.head_warmup_epochs=0",
        "bissl.lower_steps=1",
        "bissl.cg_iters=3",
        "bissl.lam=0.5",
        *overrides,
    )
    phase = _bissl(cfg, data)
    _steps(phase, 1)  # one lower step: θ ≠ φ
    return phase, copy.deepcopy(phase)


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_direct_term_theta(tiny_config, data, gamma):
    """direct_term theta: g_φ = x + γ∇_θ L_D(θ), g_ψ = (1 + γ)∇_ψ L_D(θ); φ's statistics stay."""
    phase, twin = _after_lower_step(tiny_config, data, "bissl.direct_term=theta", f"bissl.gamma={gamma}")
    stats = {k: v.clone() for k, v in phase.phi_net.state_dict().items() if "running" in k}
    (row,) = _steps(phase, 1)
    assert row["part"] == "upper"
    want = _upper_terms(twin, 0.5)
    for p, x, gt in zip(phase.phi_params, want["x"], want["gt"]):
        torch.testing.assert_close(p.grad, x + gamma * gt, rtol=2e-4, atol=1e-6)
    for p, gt in zip(phase.head_params, want["gt_head"]):
        torch.testing.assert_close(p.grad, (1 + gamma) * gt, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(phase.phi_net.state_dict()[k], v) for k, v in stats.items())
    assert float(row["loss"]) == float(row["loss_theta"])


def test_prox_pull(tiny_config, data):
    """prox_pull ρ: g_φ = x + γ∇_φ L_D(φ) + ρλ(φ − θ)."""
    rho, gamma = 2.0, 0.5
    phase, twin = _after_lower_step(tiny_config, data, f"bissl.prox_pull={rho}", f"bissl.gamma={gamma}")
    _steps(phase, 1)
    want = _upper_terms(twin, 0.5)
    diffs = [(ph - th).abs().max() for ph, th in zip(want["phi"], want["theta"])]
    assert max(diffs) > 0  # the pull is non-trivial
    for p, x, gp, ph, th in zip(phase.phi_params, want["x"], want["gp"], want["phi"], want["theta"]):
        torch.testing.assert_close(p.grad, x + gamma * gp + rho * 0.5 * (ph - th), rtol=2e-4, atol=1e-6)
    for p, gt, gp in zip(phase.head_params, want["gt_head"], want["gp_head"]):
        torch.testing.assert_close(p.grad, gt + gamma * gp, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("solver", ["neumann", "cg_layerwise"])
def test_inverse_hvp_approximations(tiny_config, data, solver):
    """The solver variants feed the upper gradient unchanged: g_φ = x_solver + γ∇_φ L_D(φ)."""
    phase, twin = _after_lower_step(tiny_config, data, f"bissl.solver={solver}")
    _steps(phase, 1)
    want = _upper_terms(twin, 0.5)
    for p, x, gp in zip(phase.phi_params, want["x"], want["gp"]):
        torch.testing.assert_close(p.grad, x + gp, rtol=2e-4, atol=1e-6)


def test_grad_ratio_lam_drives_lower_and_upper_steps(tiny_config, data):
    """After a lower step λ follows the EMA rule; the lower step's proximal term and the next
    upper step's IFT both use the schedule's current λ."""
    phase, _ = _after_lower_step(
        tiny_config,
        data,
        "bissl.lam_schedule=grad_ratio",
        "bissl.lam_options={ratio: 0.5, ema: 0.5}",
        "bissl.lower_steps=2",
    )
    # Recompute the rule from the step's own statistics.
    twin = copy.deepcopy(phase)
    theta = torch.cat([p.detach().flatten() for p in twin.theta_net.parameters()])
    phi = torch.cat([p.detach().flatten() for p in twin.phi_params])
    (row,) = _steps(phase, 1)
    assert row["part"] == "lower" and row["lam"] == twin.lam_schedule.value
    g_pretext = torch.cat([p.grad.flatten() for p in phase.theta_net.parameters()]) - row["lam"] * (theta - phi)
    target = 0.5 * float(g_pretext.norm()) / float((theta - phi).norm())
    target = min(50.0, max(0.005, target))
    lam = 0.5 * row["lam"] + 0.5 * target
    assert phase.lam_schedule.value == pytest.approx(lam, rel=1e-4)
    assert phase.lam_schedule.value != pytest.approx(0.5)  # it moved
    twin = copy.deepcopy(phase)
    (row,) = _steps(phase, 1)
    assert row["part"] == "upper" and row["lam"] == pytest.approx(lam, rel=1e-4)
    want = _upper_terms(twin, phase.lam_schedule.value)
    for p, x, gp in zip(phase.phi_params, want["x"], want["gp"]):
        torch.testing.assert_close(p.grad, x + gp, rtol=2e-4, atol=1e-6)


def test_per_tensor_lam_drives_lower_and_upper_steps(tiny_config, data):
    """``grad_ratio_per_tensor``: each tensor's λ_i follows the rule from its own gradient and
    distance; the lower step pulls each tensor with its λ_i, the next upper step solves the IFT
    system with Λ = diag(λ_i), and the metrics' λ is their mean."""
    phase, _ = _after_lower_step(
        tiny_config,
        data,
        "bissl.lam_schedule=grad_ratio_per_tensor",
        "bissl.lam_options={ratio: 0.5, ema: 0.5}",
        "bissl.lower_steps=2",
        "bissl.prox_pull=0.5",
    )
    before = phase.lam_schedule.value
    assert before == (0.5,) * len(phase.phi_params)  # θ = φ at the first step: every λ_i kept
    twin = copy.deepcopy(phase)
    thetas = [p.detach().clone() for p in twin.theta_net.parameters()]
    phis = [p.detach().clone() for p in twin.phi_params]
    (row,) = _steps(phase, 1)
    assert row["part"] == "lower" and row["lam"] == pytest.approx(0.5)
    want = []
    for p, t, f, lam in zip(phase.theta_net.parameters(), thetas, phis, before):
        g = p.grad - lam * (t - f)  # the step's gradient minus its proximal term
        target = min(50.0, max(0.005, 0.5 * float(g.norm()) / float((t - f).norm())))
        want.append(0.5 * lam + 0.5 * target)
    after = phase.lam_schedule.value
    assert after == pytest.approx(tuple(want), rel=1e-4) and len(set(after)) > 1  # one λ per tensor
    twin = copy.deepcopy(phase)
    (row,) = _steps(phase, 1)
    assert row["part"] == "upper" and row["lam"] == pytest.approx(sum(after) / len(after))
    names = [n for n, _ in twin.theta_net.named_parameters()]
    terms = _upper_terms(twin, dict(zip(names, after)))
    for p, x, gp, t, f, lam in zip(phase.phi_params, terms["x"], terms["gp"], terms["theta"], terms["phi"], after):
        torch.testing.assert_close(p.grad, x + gp + 0.5 * lam * (f - t), rtol=2e-4, atol=1e-6)
    # The per-tensor solve is not the scalar one at the mean λ (the check above can tell them apart).
    scalar = _upper_terms(copy.deepcopy(twin), sum(after) / len(after))["x"]
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(scalar, terms["x"])) > 1e-3


def test_lam_schedules_formulas():
    stats = LowerStepStats(step=0, pretext_grad_norm=3.0, distance=0.5, phi_norm=10.0)
    const = ConstantLam(0.1)
    const.observe(stats)
    assert const.value == 0.1
    ratio = GradRatioLam(0.1, ratio=0.2, ema=0.75)
    ratio.observe(stats)  # target 0.2 * 3 / 0.5 = 1.2
    assert ratio.value == pytest.approx(0.75 * 0.1 + 0.25 * 1.2)
    ratio.observe(LowerStepStats(1, 3.0, 0.0, 10.0))  # θ = φ: no ratio, λ kept
    assert ratio.value == pytest.approx(0.375)
    clipped = GradRatioLam(0.1, ratio=1e6, ema=0.0)
    clipped.observe(stats)
    assert clipped.value == pytest.approx(10.0)  # max = 100 λ
    dist = DistanceLam(0.1, target=0.01, power=2.0)
    dist.observe(LowerStepStats(0, 1.0, 0.05, 10.0))  # relative 0.005 < target: base λ
    assert dist.value == 0.1
    dist.observe(stats)  # relative 0.05 -> 0.1 * 5^2
    assert dist.value == pytest.approx(2.5)
    restored = GradRatioLam(0.1, ratio=0.2, ema=0.75)
    restored.load_state_dict(ratio.state_dict())
    assert restored.value == ratio.value
    per = GradRatioPerTensorLam(0.1, ratio=0.2, ema=0.75)
    assert per.value == 0.1  # one λ until the tensors are known
    per.observe(LowerStepStats(0, 3.0, 0.5, 10.0, grad_norms=(3.0, 1.0, 2.0), distances=(0.5, 0.0, 1e6)))
    assert per.value == pytest.approx((0.75 * 0.1 + 0.25 * 1.2, 0.1, 0.75 * 0.1 + 0.25 * 0.001))  # kept, min
    again = GradRatioPerTensorLam(0.1)
    again.load_state_dict(per.state_dict())
    assert again.value == per.value
    with pytest.raises(ValueError, match="2 tensors observed, 3 before"):
        per.observe(LowerStepStats(1, 1.0, 1.0, 1.0, grad_norms=(1.0, 1.0), distances=(1.0, 1.0)))
    with pytest.raises(ValueError, match="no per-tensor statistics"):
        GradRatioPerTensorLam(0.1).observe(stats)


class _Halving:
    """A user schedule: halves λ after every lower step (for the plug-in test)."""

    def __init__(self, lam: float, floor: float = 0.0) -> None:
        self.value, self.floor = float(lam), floor

    def observe(self, stats: LowerStepStats) -> None:
        self.value = max(self.floor, self.value / 2)

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def halving(lam: float, **options) -> _Halving:
    return _Halving(lam, **options)


def test_custom_lam_schedule_plugs_in(tiny_config, data):
    spec = f"{__name__}:halving"
    assert isinstance(build_lam_schedule(spec, 0.4, {"floor": 0.1}), _Halving)
    phase, _ = _after_lower_step(tiny_config, data, f"bissl.lam_schedule={spec}", "bissl.lower_steps=2")
    assert phase.lam_schedule.value == pytest.approx(0.25)
    (row,) = _steps(phase, 1)
    assert row["lam"] == pytest.approx(0.25) and phase.lam_schedule.value == pytest.approx(0.125)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["bissl.lam_schedule=nope"], "lam_schedule"),
        (["bissl.lam_schedule=grad_ratio", "bissl.lam_options={ratoi: 1}"], "bad options"),
        (["bissl.lam_schedule=grad_ratio", "bissl.lam_options={ema: 1.5}"], "ema"),
        (["bissl.lam_schedule=no_such_module_xyz:f"], "cannot import"),
        (["bissl.direct_term=psi"], "direct_term"),
        (["bissl.prox_pull=-1"], "prox_pull"),
        (
            ["bissl.lam_schedule=grad_ratio_per_tensor", "bissl.on_indefinite=adaptive_damping"],
            "needs a single λ",
        ),
    ],
)
def test_bad_variant_config(tiny_config, overrides, match):
    """Caught before any work: by the config's validation or the run's preflight."""
    from bissl.trainer.preflight import preflight

    with pytest.raises(ConfigError, match=match):
        preflight(tiny_config(*overrides))


def test_adaptive_lam_resumes_exactly(tmp_path, tiny_config):
    """The schedule's state is checkpointed: a killed run resumes to the same λ and weights."""
    from bissl.trainer import RunInterrupted, run_experiment
    from bissl.trainer.checkpoint import load_checkpoint

    overrides = ("bissl.lam_schedule=grad_ratio", "bissl.lam_options={ratio: 0.5, ema: 0.5}", "baseline.enabled=false")
    full = tmp_path / "full"
    run_experiment(tiny_config(*overrides), full)
    cut = tmp_path / "cut"
    with pytest.raises(RunInterrupted):
        run_experiment(tiny_config(*overrides, "debug.stop_after_steps=14"), cut)  # inside BiSSL
    run_experiment(tiny_config(*overrides), cut)
    from bissl.trainer.metrics import read_metrics

    a = load_checkpoint(full / "seed_0/checkpoints/bissl.done.pt")["result"]
    b = load_checkpoint(cut / "seed_0/checkpoints/bissl.done.pt")["result"]
    for k, v in a["upper_backbone"].items():
        assert torch.equal(v, b["upper_backbone"][k]), k
    lams = [[r["lam"] for r in read_metrics(d / "seed_0/metrics.csv") if r["part"] == "upper"] for d in (full, cut)]
    assert lams[0] == lams[1] and len(set(lams[0])) > 1  # same λ trajectory, and it moved


def test_hvp_mode_auto_picks_a_working_mode(tiny_config, data):
    """hvp_mode auto probes the lower loss once (fwdrev works through the CNN) and the step
    equals the explicit-mode step."""
    grads = {}
    for mode in ("auto", "fwdrev"):
        phase, _ = _after_lower_step(tiny_config, data, f"bissl.hvp_mode={mode}")
        (row,) = _steps(phase, 1)
        assert row["part"] == "upper"
        grads[mode] = [p.grad.clone() for p in phase.phi_params]
    for a, b in zip(grads["auto"], grads["fwdrev"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
