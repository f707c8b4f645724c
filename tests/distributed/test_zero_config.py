"""The ``deepspeed:`` section: strict validation and the DeepSpeed JSON it produces."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from bissl.distributed import DeepSpeedSettings, build_bilevel_engines, import_deepspeed
from bissl.distributed.testing import toy_objectives
from bissl.optim import LARS


def test_defaults_and_ds_config():
    s = DeepSpeedSettings.from_dict({"zero_stage": 2, "reduce_bucket_size": 5e6})
    cfg = s.to_ds_config(clip_norm=10.0)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 5_000_000  # YAML float -> int
    assert cfg["gradient_clipping"] == 10.0 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "stage3_prefetch_bucket_size" not in cfg["zero_optimization"]
    assert "stage3_prefetch_bucket_size" in DeepSpeedSettings(zero_stage=3).to_ds_config(clip_norm=1.0)["zero_optimization"]


@pytest.mark.parametrize("section, match", [
    ({"zero_stgae": 1}, "did you mean 'zero_stage'"),
    ({"zero_stage": 4}, "0, 1, 2 or 3"),
    ({"zero_stage": True}, "0, 1, 2 or 3"),
    ({"overlap_comm": "yes"}, "true or false"),
    ({"reduce_bucket_size": 0}, "positive integer"),
    ({"config": {"fp16": {"enabled": True}}}, "float32"),
    ({"config": {"optimizer": {"type": "Adam"}}}, "torch optimizers"),
    ({"config": {"gradient_accumulation_steps": 4}}, "gradient_accumulation_steps"),
    ({"config": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}}, "offload"),
    ({"config": "/nonexistent/ds.json"}, "no such file"),
])
def test_bad_sections_are_refused(section, match):
    with pytest.raises(ValueError, match=match):
        DeepSpeedSettings.from_dict(section)


def test_json_file_is_the_base_and_short_keys_override(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1234},
                                "fp16": {"enabled": False}, "steps_per_print": 7}))
    s = DeepSpeedSettings.from_dict({"config": str(path), "allgather_bucket_size": 99})
    assert s.zero_stage == 3 and s.reduce_bucket_size == 1234 and s.allgather_bucket_size == 99
    cfg = s.to_ds_config(clip_norm=None)
    assert cfg["steps_per_print"] == 7 and cfg["gradient_clipping"] == 0.0
    assert DeepSpeedSettings.from_dict({"config": str(path), "zero_stage": 1}).zero_stage == 1


def test_layerwise_optimizer_refused_under_zero():
    """Checked before DeepSpeed is imported: runs without DeepSpeed installed."""
    lower, upper = toy_objectives()
    sgd_up = torch.optim.SGD(upper.parameters(), lr=0.1)
    lars = LARS(list(lower.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="not elementwise"):
        build_bilevel_engines(lower, upper, lower_optimizer=lars, upper_optimizer=sgd_up,
                              settings={"zero_stage": 1})


def test_optimizer_must_cover_the_objective():
    lower, upper = toy_objectives()
    partial = torch.optim.SGD(lower.backbone.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="exactly the trainable parameters"):
        build_bilevel_engines(lower, upper, lower_optimizer=partial,
                              upper_optimizer=torch.optim.SGD(upper.parameters(), lr=0.1))


def test_backbones_must_pair():
    lower, _ = toy_objectives(width=4)
    _, upper = toy_objectives(width=5)
    with pytest.raises(ValueError, match="backbones differ"):
        build_bilevel_engines(lower, upper, lower_optimizer=torch.optim.SGD(lower.parameters(), lr=0.1),
                              upper_optimizer=torch.optim.SGD(upper.parameters(), lr=0.1))


def test_missing_deepspeed_gives_the_install_command(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    with pytest.raises(ImportError, match="pip install --no-deps --no-build-isolation deepspeed"):
        import_deepspeed()
