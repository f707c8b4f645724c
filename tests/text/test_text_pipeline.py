"""The unchanged pipeline with ``task: text``: builders dispatch, a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bissl.config import ConfigError, load_config
from bissl.data.tokenizer import load_tokenizer
from bissl.extras import describe_missing
from bissl.trainer import run_experiment
from bissl.trainer.builders import (
    TokenBatch,
    build_backbone_from,
    build_downstream_augment,
    build_pretext_from,
    build_two_view,
)
from bissl.trainer.experiment import load_pipeline_data

# Skipped (with the reason) without the [text] extra; CI sets BISSL_REQUIRE_ALL=1, where a skip fails.
pytestmark = pytest.mark.skipif(bool(describe_missing("text")), reason=describe_missing("text"))

TINY = Path(__file__).with_name("tiny_text.yaml")


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


@pytest.fixture(scope="module")
def data(cfg):
    return load_pipeline_data(cfg)


def test_pipeline_data_and_builders(cfg, data):
    assert data.task == "text" and data.vocab_size == 300 and data.pad_id == 0
    assert data.pretext_x.dtype == torch.int64 and data.pretext_x.shape[1] == 16
    assert data.train_x.shape == (100, 16) and data.test_x.shape == (60, 16)
    assert data.num_classes == 2 and data.max_len == 16
    net = build_backbone_from(cfg, data, torch.device("cpu"))
    assert net.out_dim == 16 and net.vocab_size == 300
    views = build_two_view(cfg, data)(data.pretext_x[:4], torch.Generator())
    assert isinstance(views, tuple) and len(views) == 1
    assert torch.equal(views[0], data.pretext_x[:4])
    pretext = build_pretext_from(cfg, net, torch.device("cpu"))
    loss = pretext.loss(net, *views)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert net(data.train_x[:5]).shape == (5, 16)  # the downstream path: head(backbone(x))
    assert build_downstream_augment(cfg, data) is None
    with pytest.raises(ValueError, match="int64 token ids"):
        TokenBatch()(torch.zeros(2, 3), None)


def test_config_mismatches(data):
    with pytest.raises(ConfigError, match="text runs need 'gpt'"):
        build_backbone_from(
            load_config(TINY, ["model.backbone=small_cnn", "model.options={}"]), data, torch.device("cpu")
        )
    with pytest.raises(ConfigError, match="text runs support 'none'"):
        build_downstream_augment(load_config(TINY, ["finetune.augment=crop"]), data)
    with pytest.raises(ConfigError, match="are set from the data/tokenizer"):
        build_backbone_from(load_config(TINY, ["model.options={vocab_size: 9}"]), data, torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown text dataset 'imdb'"):
        load_pipeline_data(load_config(TINY, ["data.name=imdb"]))


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, cfg):
    run_dir = tmp_path / "run"
    results = run_experiment(cfg, run_dir)
    saved = json.loads((run_dir / "results.json").read_text())
    assert (saved["dataset"], saved["backbone"], saved["pretext"]) == ("polarity", "gpt", "gpt")
    for arm in ("bissl", "baseline"):
        acc = saved["per_seed"]["0"][arm]["test_acc"]
        assert 0.0 <= acc <= 1.0 and acc * 60 == pytest.approx(round(acc * 60))  # k of 60 texts
    tok = load_tokenizer(run_dir / "tokenizer.json")
    assert tok.vocab_size == 300
    # The saved tokenizer is the one the run used: loading the data through it gives equal tensors.
    again = load_pipeline_data(cfg, run_dir)
    assert torch.equal(again.test_x, load_pipeline_data(cfg).test_x)
    # A second invocation on the same directory re-reports the finished run.
    assert run_experiment(cfg, run_dir)["summary"] == results["summary"]
