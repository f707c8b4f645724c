"""Read-outs and optimizers: finetune.mode (full | linear_probe), finetune.optimizer and
pretext.optimizer (AdamW); the random streams stay those of the seed, so arms stay paired."""

from __future__ import annotations

import pytest
import torch

from bissl.trainer.experiment import load_pipeline_data
from bissl.trainer.finetune_phase import FinetunePhase
from bissl.trainer.loop import RunContext
from bissl.trainer.pretext_phase import PretextPhase
from bissl.trainer.rng import seed_everything


@pytest.fixture(scope="module")
def data():
    from bissl.config import Config

    return load_pipeline_data(Config())


def _ctx() -> RunContext:
    return RunContext(seed=0, device=torch.device("cpu"), ckpt_dir=None, metrics=None)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _backbone_state(tiny_config, data):
    seed_everything(0)
    torch.manual_seed(123)
    phase = PretextPhase("pretext", tiny_config(), data, _ctx())
    phase.step()  # a backbone whose BatchNorm running statistics are not the initial ones
    return phase.result()["backbone"]


def _finetune(cfg, data, start, steps):
    seed_everything(0)
    phase = FinetunePhase("finetune_bissl", cfg, data, _ctx(), start)
    head0 = _state(phase.model.module.head)
    rows = []
    for _ in range(steps):
        rows += phase.step()
    return phase, head0, rows


def test_linear_probe_trains_only_the_head(tiny_config, data):
    start = _backbone_state(tiny_config, data)
    probe, head0, rows = _finetune(tiny_config("finetune.mode=linear_probe"), data, start, 3)
    after = probe.model.module.backbone.state_dict()
    # Weights and BatchNorm running statistics untouched (eval mode), no gradient kept.
    assert all(torch.equal(start[k], after[k]) for k in start)
    assert all(p.grad is None for p in probe.model.module.backbone.parameters())
    assert any(not torch.equal(head0[k], v) for k, v in probe.model.module.head.state_dict().items())
    assert all(torch.isfinite(r["loss"]) for r in rows if "loss" in r)
    full, head0_full, _ = _finetune(tiny_config(), data, start, 3)
    assert any(not torch.equal(start[k], v) for k, v in full.model.module.backbone.state_dict().items())
    # Paired streams: the same head initialisation and the same data order in both read-outs.
    assert all(torch.equal(head0[k], head0_full[k]) for k in head0)
    assert probe.sampler.state_dict() == full.sampler.state_dict()
    assert torch.equal(probe.aug_gen.get_state(), full.aug_gen.get_state())


def test_linear_probe_resumes_identically(tiny_config, data):
    start = _backbone_state(tiny_config, data)
    cfg = tiny_config("finetune.mode=linear_probe")
    straight, _, _ = _finetune(cfg, data, start, 4)
    first, _, _ = _finetune(cfg, data, start, 2)
    seed_everything(0)
    resumed = FinetunePhase("finetune_bissl", cfg, data, _ctx(), start)
    resumed.load_state_dict(first.state_dict())
    resumed.step_idx = first.step_idx
    for _ in range(2):
        resumed.step()
    for k, v in straight.model.module.head.state_dict().items():
        assert torch.equal(v, resumed.model.module.head.state_dict()[k])


def test_adamw_finetune_decays_matrices_only(tiny_config, data):
    start = _backbone_state(tiny_config, data)
    cfg = tiny_config(
        "finetune.optimizer=adamw", "finetune.lr=0.001", "finetune.weight_decay=0.01", "finetune.betas=[0.8, 0.99]"
    )
    phase, _, rows = _finetune(cfg, data, start, 2)
    opt = phase.model.optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.99)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for p in list(phase.model.module.backbone.parameters()) + list(phase.model.module.head.parameters()):
        assert (id(p) in decayed) == (p.dim() >= 2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(phase.model.params)
    assert all(torch.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_adamw_pretext_and_lars_for_the_matched_continuation(tiny_config, data):
    from bissl.distributed.trainable import OptimizerSpec
    from bissl.optim import LARS

    cfg = tiny_config("pretext.optimizer=adamw", "pretext.lr=0.001")
    seed_everything(0)
    phase = PretextPhase("pretext", cfg, data, _ctx())
    assert isinstance(phase.model.optimizer, torch.optim.AdamW)
    phase.step()
    # The compute-matched continuation runs the BiSSL lower level's LARS settings, whatever the
    # pretext optimizer was.
    matched = PretextPhase(
        "pretext_matched",
        cfg,
        data,
        _ctx(),
        total_steps=2,
        opt=OptimizerSpec("lars", 1.0, 0.9, 1e-6, 1e-3),
        warmup_steps=1,
        batch_size=128,
        init=phase.result(),
    )
    assert isinstance(matched.model.optimizer, LARS)


@pytest.mark.parametrize(
    "override, match",
    [
        ("finetune.mode=probe", "'finetune.mode' must be one of 'full', 'linear_probe'"),
        ("finetune.optimizer=lars", "'finetune.optimizer' must be one of 'sgd', 'adamw'"),
        ("pretext.betas=[0.9]", "'pretext.betas' must have 2 items"),
        ("finetune.betas=[0.9, 1.0]", "'finetune.betas' item 1 must be in \\[0, 1\\)"),
    ],
)
def test_bad_readout_keys(tiny_config, override, match):
    from bissl.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        tiny_config(override)
