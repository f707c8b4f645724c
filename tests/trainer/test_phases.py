"""Each phase on a tiny budget, and the BiSSL gradients against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from bissl.ops import batchnorm_stats_frozen
from bissl.tasks.downstream import classification_loss
from bissl.trainer.bissl_phase import BisslPhase
from bissl.trainer.experiment import load_pipeline_data
from bissl.trainer.finetune_phase import FinetunePhase
from bissl.trainer.loop import RunContext
from bissl.trainer.pretext_phase import PretextPhase
from bissl.trainer.rng import seed_everything


@pytest.fixture(scope="module")
def data():
    from bissl.config import Config

    return load_pipeline_data(Config())  # digits, default split


def _ctx() -> RunContext:
    return RunContext(seed=0, device=torch.device("cpu"), ckpt_dir=None, metrics=None)


def _run(phase, n=None):
    rows = []
    for _ in range(phase.total_steps if n is None else n):
        rows += phase.step()
    return rows


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_pretext_phase_trains_backbone_and_head(tiny_config, data, method):
    cfg = tiny_config(f"pretext.method={method}")
    seed_everything(0)
    phase = PretextPhase("pretext", cfg, data, _ctx())
    assert phase.total_steps == len(data.pretext_x) // 256  # 1 epoch, drop_last
    before = _params(phase.model.module.backbone)
    rows = _run(phase)
    assert phase.step_idx == phase.total_steps and len(rows) == phase.total_steps
    assert all(torch.isfinite(r["loss"]) for r in rows)
    assert [r["lr"] for r in rows][:2] == [0.5, 1.0]  # warm-up 0.5 epoch = 2 steps
    after = phase.result()["backbone"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if method == "byol":  # EMA: the target moved, but only a little (m = 0.9995)
        t = phase.model.module.head.target_backbone.state_dict()
        moved = [
            k
            for k in before
            if before[k].is_floating_point() and "running" not in k and not torch.equal(t[k], before[k])
        ]
        assert moved


def _bissl(cfg, data):
    seed_everything(0)
    pre = PretextPhase("pretext", cfg, data, _ctx())
    _run(pre)
    seed_everything(1)
    return BisslPhase(cfg, data, _ctx(), pre.result())


def test_bissl_schedule_and_start_state(tiny_config, data):
    cfg = tiny_config()
    phase = _bissl(cfg, data)
    # warm-up 0.25 epoch of 1258 // 128 = 9 steps -> 3 steps; then 2 stages x (2 lower + 2 upper)
    assert phase.warmup_steps == 3 and phase.total_steps == 3 + 2 * 4
    parts = [phase.locate(i)[0] for i in range(phase.total_steps)]
    assert parts == ["warmup"] * 3 + ["lower", "lower", "upper", "upper"] * 2
    theta, phi = phase.theta_net.state_dict(), phase.phi_net.state_dict()
    assert all(torch.equal(theta[k], phi[k]) for k in theta)  # φ starts as a copy of θ
    assert phase.describe_step(3 + 4) == "upper step 2 of 2 in training stage 1 of 2"
    # head warm-up trains ψ_D only; φ (and its BatchNorm statistics) stay frozen
    phi_before, head_before = _params(phase.phi_net), _params(phase.head)
    rows = _run(phase, 3)
    assert [r["part"] for r in rows] == ["warmup"] * 3
    assert all(torch.equal(phi_before[k], v) for k, v in phase.phi_net.state_dict().items())
    assert not torch.equal(head_before["weight"], phase.head.weight)


def test_lower_step_gradient_is_pretext_plus_proximal(tiny_config, data):
    """∇ = ∇L_P(θ) + λ(θ − φ) on backbone parameters, ∇L_P on the pretext head."""
    lam = 0.3  # large, so a wrong proximal term would show
    cfg = tiny_config(f"bissl.lam={lam}", "bissl.clip_norm=1e9", "bissl.head_warmup_epochs=0")
    phase = _bissl(cfg, data)
    with torch.no_grad():  # make θ ≠ φ
        for p in phase.phi_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = copy.deepcopy(phase)  # same state, same generators: replays the same batch and views
    (row,) = _run(phase, 1)
    x = twin.batches.data.pretext_x[twin.batches.lower_sampler.next_batch()]
    v1, v2 = twin.batches.two_view(x, twin.batches.lower_gen)
    twin.theta_net.train()
    twin.pretext.train()
    loss = twin.pretext.loss(twin.theta_net, v1, v2)
    prox = (
        0.5
        * lam
        * sum(((t - p.detach()) ** 2).sum() for t, p in zip(twin.theta_net.parameters(), twin.phi_net.parameters()))
    )
    expected = torch.autograd.grad(loss + prox, twin.lower_params, retain_graph=True)
    for got, want in zip([p.grad for p in phase.lower_params], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The row's diagnostics: ‖∇_θ L_P‖ (before the proximal term), ‖θ − φ‖ and λ‖θ − φ‖.
    g_pretext = torch.autograd.grad(loss, list(twin.theta_net.parameters()))
    pairs = zip(twin.theta_net.parameters(), twin.phi_net.parameters())
    dist = torch.sqrt(sum(((t - p) ** 2).sum() for t, p in pairs)).detach()
    grad_norm = torch.sqrt(sum((g**2).sum() for g in g_pretext))
    assert float(row["pretext_grad_norm"]) == pytest.approx(float(grad_norm), rel=1e-5)
    assert float(row["distance"]) == pytest.approx(float(dist), rel=1e-6)
    assert float(row["prox_grad_norm"]) == pytest.approx(lam * float(dist), rel=1e-6)
    assert all(p.grad is None for p in phase.phi_params)  # φ is a constant of the lower problem


@pytest.mark.parametrize("gamma", [1.0, 0.25])
def test_upper_step_gradients_first_order(tiny_config, data, gamma):
    """With the identity solver x = ∇_θ L_D(θ): g_φ = ∇_θ L_D(θ) + γ∇_φ L_D(φ),
    g_ψ = ∇_ψ L_D(θ) + γ∇_ψ L_D(φ); θ's BatchNorm statistics are untouched, φ's move."""
    cfg = tiny_config(
        "bissl.solver=identity",
        f"bissl.gamma={gamma}",
        "bissl.clip_norm=1e9",
        "bissl.head_warmup_epochs=0",
        "bissl.lower_steps=1",
    )
    phase = _bissl(cfg, data)
    _run(phase, 1)  # one lower step: θ ≠ φ
    twin = copy.deepcopy(phase)
    theta_stats = {k: v.clone() for k, v in phase.theta_net.state_dict().items() if "running" in k}
    phi_stats = {k: v.clone() for k, v in phase.phi_net.state_dict().items() if "running" in k}
    rows = _run(phase, 1)
    assert rows[0]["part"] == "upper" and rows[0]["cg_iters"] == 0
    idx = twin.batches.upper_sampler.next_batch()
    x = twin.batches.down_aug(twin.batches.data.train_x[idx], twin.batches.upper_gen)
    y = twin.batches.data.train_y[idx]
    for m in (twin.theta_net, twin.phi_net, twin.head):
        m.train()
    theta = dict(twin.theta_net.named_parameters())
    with batchnorm_stats_frozen():
        l_theta = classification_loss(twin.head(functional_call(twin.theta_net, theta, (x,))), y)
    l_phi = classification_loss(twin.head(twin.phi_net(x)), y)
    heads = list(twin.head.parameters())
    g_theta = torch.autograd.grad(l_theta, list(theta.values()) + heads)
    g_phi = torch.autograd.grad(l_phi, twin.phi_params + heads)
    n = len(twin.phi_params)
    for p, gt, gp in zip(phase.phi_params, g_theta[:n], g_phi[:n]):
        torch.testing.assert_close(p.grad, gt + gamma * gp, rtol=1e-5, atol=1e-6)
    for p, gt, gp in zip(phase.head_params, g_theta[n:], g_phi[n:]):
        torch.testing.assert_close(p.grad, gt + gamma * gp, rtol=1e-5, atol=1e-6)
    assert float(rows[0]["loss_theta"]) == pytest.approx(l_theta.item(), rel=1e-6)
    for k, v in phase.theta_net.state_dict().items():
        if k in theta_stats:
            assert torch.equal(v, theta_stats[k]), k
    assert any(not torch.equal(phase.phi_net.state_dict()[k], v) for k, v in phi_stats.items())


def test_hvp_batch_is_drawn_once_per_stage(tiny_config, data):
    phase = _bissl(tiny_config("bissl.head_warmup_epochs=0"), data)
    a1, _ = phase.batches.hvp_views(0)
    b1, _ = phase.batches.hvp_views(0)
    c1, _ = phase.batches.hvp_views(1)
    assert a1 is b1 and a1.shape[0] == 32 and not torch.equal(a1, c1)
    phase.batches._hvp = None  # as after a resume: redrawn identically
    assert torch.equal(phase.batches.hvp_views(0)[0], a1)


def test_cg_diagnostics_logged_and_indefinite_policies(tiny_config, data):
    from bissl.solvers import SolverError

    # Undamped with a tiny λ, the system I + H/λ of a random-init contrastive loss is indefinite.
    indefinite = ("bissl.damping=0.0", "bissl.lam=1e-6", "bissl.head_warmup_epochs=0")
    phase = _bissl(tiny_config(*indefinite, "bissl.on_indefinite=warn"), data)
    with pytest.warns(RuntimeWarning, match="indefinite"):
        rows = _run(phase, 4)
    upper = [r for r in rows if r["part"] == "upper"]
    assert len(upper) == 2 and all(r["always_log"] for r in upper)
    assert all(isinstance(r["cg_negative_curvature"], bool) for r in upper)
    assert any(r["cg_negative_curvature"] for r in upper)
    assert {r["cg_action"] for r in upper if r["cg_indefinite"]} == {"warned"}
    # The default policy re-solves the flagged system with MINRES: a solution, never a zeroed one.
    default = _bissl(tiny_config(*indefinite), data)
    rows = _run(default, 4)
    actions = [r["cg_action"] for r in rows if r["part"] == "upper"]
    assert "fallback:minres" in actions
    strict = _bissl(tiny_config(*indefinite, "bissl.on_indefinite=raise"), data)
    _run(strict, 2)
    with pytest.raises(SolverError, match="upper step 1 of 2 in training stage 1"):
        _run(strict, 2)


def test_finetune_is_paired_and_evaluates_val(tiny_config, data):
    cfg = tiny_config("finetune.epochs=2")
    seed_everything(0)
    pre = PretextPhase("pretext", cfg, data, _ctx())
    a = FinetunePhase("finetune_bissl", cfg, data, _ctx(), pre.result()["backbone"])
    seed_everything(123)  # a different global RNG state must not change the arm's randomness
    b = FinetunePhase("finetune_baseline", cfg, data, _ctx(), pre.result()["backbone"])
    assert torch.equal(a.model.module.head.weight, b.model.module.head.weight)
    rows_a, rows_b = _run(a), _run(b)
    evals = [r for r in rows_a if r["part"] == "eval"]
    assert [r["round"] for r in evals] == [1, 2] and 0.0 <= evals[-1]["val_acc"] <= 1.0
    assert [float(r["loss"]) for r in rows_a if r["part"] == "train"] == [
        float(r["loss"]) for r in rows_b if r["part"] == "train"
    ]  # same backbone: same run
    res = a.result()
    assert 0.0 <= res["test_acc"] <= 1.0 and res["val_acc"] == evals[-1]["val_acc"]
