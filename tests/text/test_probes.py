"""The text probes (majority class, bag-of-tokens logistic regression) against hand-checked
answers and scikit-learn run directly; repeated k-fold by seed through a whole tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bissl.config import ConfigError, load_config
from bissl.data.options import seed_split, text_task_options
from bissl.report_tables import render_run_table
from bissl.tasks.probes import BAG_OF_TOKENS_C, bag_of_tokens_probe, majority_probe, token_frequencies
from bissl.trainer import load_pipeline_data, run_experiment
from bissl.trainer.experiment import tokenizer_path

TINY = Path(__file__).resolve().parent / "tiny_text.yaml"


def test_majority_predicts_the_training_mode_with_smoothed_frequency_loss():
    train = torch.tensor([2, 2, 0, 2, 1, 0])  # counts 2, 1, 3 -> class 2
    val, test = torch.tensor([2, 0, 1, 2]), torch.tensor([0, 2, 2, 2, 1])
    out = majority_probe(train, val, test, num_classes=4)
    assert out["test_pred"] == [2] * 5 and out["test_correct"] == [0, 1, 1, 1, 0]
    assert out["test_acc"] == pytest.approx(3 / 5) and out["val_acc"] == pytest.approx(2 / 4)
    freq = np.array([3, 2, 4, 1]) / 10  # add-one smoothed over 4 classes (class 3 never seen)
    assert out["test_loss"] == pytest.approx(-np.mean(np.log(freq[[0, 2, 2, 2, 1]])))
    assert out["val_loss"] == pytest.approx(-np.mean(np.log(freq[[2, 0, 1, 2]])))
    # Ties go to the lowest label.
    pair = torch.tensor([1, 0, 1])
    assert majority_probe(torch.tensor([1, 0]), pair, pair, 2)["test_pred"] == [0] * 3


def test_token_frequencies_skip_padding_and_refuse_empty_rows():
    x = torch.tensor([[3, 3, 4, 0], [5, 0, 0, 0]])
    f = token_frequencies(x, vocab_size=6, pad_id=0)
    np.testing.assert_allclose(f, [[0, 0, 0, 2 / 3, 1 / 3, 0], [0, 0, 0, 0, 0, 1]])
    with pytest.raises(ValueError, match="padding only"):
        token_frequencies(torch.tensor([[0, 0]]), 6, 0)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 6\)"):
        token_frequencies(torch.tensor([[7, 0]]), 6, 0)


def _random_task(seed: int, n: int, vocab: int = 40, length: int = 12):
    """Texts whose class shifts the token distribution (learnable, not separable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(2, vocab, (n, length), generator=g)
    x[:, :4] = torch.where(torch.rand(n, 4, generator=g) < 0.6, (2 + 5 * y)[:, None].expand(n, 4), x[:, :4])
    x[:, -3:] = 0  # right padding
    return x, y


def test_bag_of_tokens_is_logistic_regression_chosen_on_validation():
    from sklearn.linear_model import LogisticRegression

    train, val, test = _random_task(0, 120), _random_task(1, 60), _random_task(2, 80)
    out = bag_of_tokens_probe(train, val, test, num_classes=3, vocab_size=40, pad_id=0)
    assert out["C"] in BAG_OF_TOKENS_C
    feats = [token_frequencies(x, 40, 0) for x, _ in (train, val, test)]
    val_acc = {}
    for c in BAG_OF_TOKENS_C:
        model = LogisticRegression(C=c, max_iter=5000).fit(feats[0], train[1].numpy())
        val_acc[c] = float(np.mean(model.predict(feats[1]) == val[1].numpy()))
    assert out["val_acc"] == pytest.approx(max(val_acc.values())) and val_acc[out["C"]] == max(val_acc.values())
    chosen = LogisticRegression(C=out["C"], max_iter=5000).fit(feats[0], train[1].numpy())
    assert out["test_pred"] == chosen.predict(feats[2]).tolist()
    assert out["test_acc"] == pytest.approx(np.mean(chosen.predict(feats[2]) == test[1].numpy()))
    assert out["test_acc"] > 0.6  # the class signal is there: well above the 1/3 of guessing


def test_bag_of_tokens_keeps_a_column_for_a_class_missing_from_training():
    (x, y), val, test = _random_task(0, 60), _random_task(1, 30), _random_task(2, 30)
    keep = y != 1
    out = bag_of_tokens_probe((x[keep], y[keep]), val, test, num_classes=3, vocab_size=40, pad_id=0)
    assert 1 not in out["test_pred"] and np.isfinite(out["test_loss"])


def test_seed_picks_fold_and_repeat():
    cfg = load_config(TINY, ["data.folds=5", "data.fold_by_seed=true", "data.split_seed=3"])
    assert [seed_split(cfg.data, s) for s in (0, 4, 5, 12)] == [(3, 0), (3, 4), (4, 0), (5, 2)]
    assert text_task_options(cfg.data, 7) == {"folds": 5, "fold": 2, "split_seed": 4}
    plain = load_config(TINY, ["data.folds=5", "data.fold=3"])
    assert seed_split(plain.data, 9) == (0, 3)
    with pytest.raises(ConfigError, match=r"'data\.fold_by_seed' needs 'data\.folds'"):
        load_config(TINY, ["data.fold_by_seed=true"])
    with pytest.raises(ConfigError, match=r"leaves 'data\.fold' at 0"):
        load_config(TINY, ["data.folds=5", "data.fold=1", "data.fold_by_seed=true"])
    # The pretext corpus is each split's training texts here: each seed keeps its own tokenizer.
    assert tokenizer_path(cfg, "r", 7) == Path("r/seed_7/tokenizer.json")
    fixed_corpus = load_config(TINY, ["data.folds=5", "data.fold_by_seed=true", "data.pretext_name=news"])
    assert tokenizer_path(fixed_corpus, "r", 7) == Path("r/tokenizer.json")


@pytest.mark.slow
def test_kfold_by_seed_run_tests_every_text_with_probe_rows(tmp_path):
    """Seeds 0..3 = 2 folds x 2 repeats: each repeat tests all 200 polarity texts once; each seed
    has its split, its own tokenizer, and the probe arms beside baseline and BiSSL."""
    cfg = load_config(TINY, ["data.folds=2", "data.fold_by_seed=true", "run.seeds=[0, 1, 2, 3]"])
    run_dir = tmp_path / "run"
    results = run_experiment(cfg, run_dir)
    per_seed = results["per_seed"]
    tested: dict[int, list[int]] = {}
    for seed in range(4):
        entry = per_seed[str(seed)]
        assert entry["split"] == {"split_seed": seed // 2, "fold": seed % 2, "folds": 2, "test_n": 100}
        assert set(entry) >= {"majority", "bag_of_tokens", "baseline", "bissl"}
        assert len(entry["bag_of_tokens"]["test_correct"]) == 100 == len(entry["bissl"]["test_correct"])
        data = load_pipeline_data(cfg, run_dir, seed)
        assert (run_dir / f"seed_{seed}" / "tokenizer.json").exists()
        # The stored predictions are of this seed's test texts.
        assert entry["majority"]["test_correct"] == (data.test_y == entry["majority"]["test_pred"][0]).int().tolist()
        tested.setdefault(seed // 2, []).extend(data.test_y.tolist())
    assert all(len(labels) == 200 and sorted(labels).count(0) == 100 for labels in tested.values())
    # Seeds of one repeat differ in their test texts; the two repeats partition differently.
    a, b = (load_pipeline_data(cfg, run_dir, s).test_x for s in (0, 2))
    assert not torch.equal(a, b)
    assert {"majority", "bag_of_tokens"} <= set(results["summary"])
    assert "bissl_vs_bag_of_tokens" in results["summary"]
    table = render_run_table(run_dir, label="run")
    assert "Stratified 2-fold, repeated with split seed(s) 0, 1" in table
    assert "2 complete repeat(s), each testing all 200 labelled texts once" in table
    assert "| majority class (training split) |" in table and "| bag-of-tokens logistic regression |" in table
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["per_seed"]["3"]["split"]["fold"] == 1


def test_configured_arms_name_the_probes_of_text_runs_only():
    from bissl.trainer.report import configured_arms

    text = load_config(TINY, ["baseline.compute_matched=true"])
    assert configured_arms(text) == ("majority", "bag_of_tokens", "baseline", "baseline_matched", "bissl")
    assert configured_arms(load_config(TINY, ["text.probes=false"])) == ("baseline", "bissl")
    image = load_config(Path(__file__).resolve().parents[1] / "trainer" / "tiny.yaml")
    assert configured_arms(image) == ("baseline", "bissl")
