"""Upper steps log the solver's health and apply ``bissl.on_indefinite`` (issue 10)."""

from __future__ import annotations

import math

import pytest
import torch

from bissl.config import ConfigError
from bissl.trainer.bissl_phase import BisslPhase
from bissl.trainer.experiment import load_pipeline_data
from bissl.trainer.loop import RunContext
from bissl.trainer.pretext_phase import PretextPhase
from bissl.trainer.rng import seed_everything

# Undamped with a tiny λ, I + H/λ of the tiny random-init contrastive loss is indefinite.
INDEFINITE = ("bissl.damping=0.0", "bissl.lam=1e-6", "bissl.head_warmup_epochs=0")


@pytest.fixture(scope="module")
def data():
    from bissl.config import Config

    return load_pipeline_data(Config())


def _upper_rows(cfg, data):
    ctx = RunContext(seed=0, device=torch.device("cpu"), ckpt_dir=None, metrics=None)
    seed_everything(0)
    pre = PretextPhase("pretext", cfg, data, ctx)
    while pre.step_idx < pre.total_steps:
        pre.step()
    seed_everything(1)
    phase = BisslPhase(cfg, data, ctx, pre.result())
    rows = []
    for _ in range(4):  # 2 lower + 2 upper steps of stage 1
        rows += phase.step()
    return [r for r in rows if r["part"] == "upper"]


@pytest.mark.parametrize("policy,action", [("fallback", "fallback:minres"), ("adaptive_damping", "adaptive_damping")])
def test_policy_acts_and_is_logged(tiny_config, data, policy, action):
    rows = _upper_rows(tiny_config(*INDEFINITE, f"bissl.on_indefinite={policy}"), data)
    assert len(rows) == 2
    for r in rows:
        assert r["cg_indefinite"] is True and r["cg_action"] == action
        assert r["cg_ritz_min"] is not None and r["cg_ritz_max"] >= r["cg_ritz_min"]
        assert math.isfinite(r["cg_residual"]) and r["cg_nonfinite"] is False
    if policy == "adaptive_damping":
        assert all(r["cg_damping_used"] > 0 for r in rows)


def test_positive_definite_steps_log_estimates_and_no_action(tiny_config, data):
    rows = _upper_rows(tiny_config("bissl.damping=1000.0", "bissl.head_warmup_epochs=0"), data)
    for r in rows:
        assert r["cg_indefinite"] is False and r["cg_action"] == "none"
        assert 0 < r["cg_ritz_min"] <= r["cg_ritz_max"] and r["cg_condition"] >= 1
        assert r["cg_damping_used"] == 1000.0


def test_fallback_to_the_same_solver_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="fallback_solver"):
        tiny_config("bissl.solver=minres", "bissl.on_indefinite=fallback")
