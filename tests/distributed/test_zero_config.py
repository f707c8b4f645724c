"""The ``deepspeed`` config section: strict validation, and the DeepSpeed JSON it produces."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bissl.config import ConfigError, config_from_dict
from bissl.distributed.engines import check_optimizer, import_deepspeed
from bissl.distributed.testing import toy_objectives
from bissl.distributed.zero_config import ds_config
from bissl.optim import LARS


def _section(**keys):
    return config_from_dict({"deepspeed": keys}).deepspeed


def test_defaults_and_ds_config():
    s = _section(zero_stage=2, reduce_bucket_size=5_000_000)
    cfg = ds_config(s, clip_norm=10.0)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 5_000_000
    assert cfg["gradient_clipping"] == 10.0 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "stage3_prefetch_bucket_size" not in cfg["zero_optimization"]
    assert "stage3_prefetch_bucket_size" in ds_config(_section(zero_stage=3), clip_norm=1.0)["zero_optimization"]


def test_sharded_hypergrad_defaults_to_zero3():
    assert _section(zero_stage=3).sharded_hypergrad and not _section(zero_stage=2).sharded_hypergrad
    assert _section(zero_stage=1, shard_hypergrad=True).sharded_hypergrad
    assert not _section(zero_stage=3, shard_hypergrad=False).sharded_hypergrad


@pytest.mark.parametrize(
    "section, match",
    [
        ({"zero_stgae": 1}, "did you mean 'zero_stage'"),
        ({"zero_stage": 4}, "one of 0, 1, 2, 3"),
        ({"zero_stage": True}, "must be an integer"),
        ({"overlap_comm": "yes"}, "true or false"),
        ({"reduce_bucket_size": 0}, ">= 1"),
        ({"config": "/nonexistent/ds.json"}, "cannot read"),
    ],
)
def test_bad_sections_are_refused_with_one_line(section, match):
    with pytest.raises(ConfigError, match=match) as err:
        _section(**section)
    assert "\n" not in str(err.value) and "deepspeed" in str(err.value)


@pytest.mark.parametrize(
    "base, match",
    [
        ({"fp16": {"enabled": True}}, "float32"),
        ({"optimizer": {"type": "Adam"}}, "optimizers are torch optimizers"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload"),
    ],
)
def test_refused_json_sections(tmp_path, base, match):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base))
    with pytest.raises(ConfigError, match=match):
        _section(config=str(path))


def test_json_file_is_the_base_and_keys_override(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "reduce_bucket_size": 1234},
                "fp16": {"enabled": False},
                "steps_per_print": 7,
            }
        )
    )
    cfg = ds_config(_section(config=str(path), zero_stage=1, allgather_bucket_size=99), clip_norm=None)
    assert cfg["steps_per_print"] == 7 and cfg["gradient_clipping"] == 0.0
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["zero_optimization"]["allgather_bucket_size"] == 99


def test_float64_is_refused_under_zero():
    with pytest.raises(ConfigError, match="float32 master weights"):
        config_from_dict({"run": {"nproc": 2, "dtype": "float64"}, "deepspeed": {"zero_stage": 1}})
    config_from_dict({"run": {"nproc": 2, "dtype": "float64"}})  # stage 0: plain data parallel


def test_layerwise_optimizer_refused_on_partitions():
    """Checked before DeepSpeed is imported (runs without it); EngineTrainable never hands LARS
    to DeepSpeed (it runs LARS as SGD + a trust-ratio transform)."""
    lower, _ = toy_objectives()
    with pytest.raises(ValueError, match="not elementwise"):
        check_optimizer(LARS(list(lower.parameters()), lr=0.1), lower, 1)
    check_optimizer(LARS(list(lower.parameters()), lr=0.1), lower, 0)


def test_optimizer_must_cover_the_module():
    lower, _ = toy_objectives()
    with pytest.raises(ValueError, match="exactly the trainable parameters"):
        check_optimizer(torch.optim.SGD(lower.backbone.parameters(), lr=0.1), lower, 2)


def test_missing_deepspeed_gives_the_install_command(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    with pytest.raises(ImportError, match=r"\[distributed\]"):
        import_deepspeed()
