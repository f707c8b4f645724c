"""Repeated stratified k-fold for the text tasks: every labelled text tested exactly once per
repeat, disjoint parts, stratified folds, plays kept whole, determinism, and the loader path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bissl.data import kfold_assignment
from bissl.data.text import clean_text, kfold_split, load_text_data
from bissl.data.text_sources import read_labelled_task


@pytest.fixture(scope="module")
def polarity():
    return read_labelled_task("polarity")


@pytest.fixture(scope="module")
def genre():
    return read_labelled_task("shakespeare_genre")


def _folds(task, k, seed, val_fraction=0.2):
    return [kfold_split(task.labels, task.groups, k, f, val_fraction, seed) for f in range(k)]


@pytest.mark.parametrize("k", [2, 5, 7])
def test_every_text_tested_exactly_once_per_repeat(polarity, k):
    parts = _folds(polarity, k, seed=0)
    tested = np.concatenate([test for _, _, test in parts])
    assert sorted(tested.tolist()) == list(range(len(polarity.labels)))
    for train, val, test in parts:
        assert not (set(train) & set(val)) and not (set(train) | set(val)) & set(test)
        assert len(train) + len(val) + len(test) == len(polarity.labels)
        counts = np.bincount(polarity.labels[test], minlength=2)
        assert counts.max() - counts.min() <= 1  # 100 + 100 texts: classes balanced in each fold
        assert len(val) == round((len(polarity.labels) - len(test)) * 0.2)


def test_kfold_assignment_is_stratified_and_balanced():
    y = np.repeat([0, 1, 2], [17, 9, 30])
    fold_of = kfold_assignment(y, 4, seed=1)
    sizes = np.bincount(fold_of)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = np.bincount(fold_of[y == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1
    with pytest.raises(ValueError, match="folds >= 2"):
        kfold_assignment(y, 1)
    with pytest.raises(ValueError, match="would be empty"):
        kfold_assignment(y[:3], 4)


def test_repeats_are_deterministic_and_differ(polarity):
    a, b = _folds(polarity, 5, seed=3), _folds(polarity, 5, seed=3)
    assert all(np.array_equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    other = _folds(polarity, 5, seed=4)
    assert not np.array_equal(a[0][2], other[0][2])
    tested = np.concatenate([test for _, _, test in other])
    assert sorted(tested.tolist()) == list(range(len(polarity.labels)))


def test_genre_folds_keep_plays_whole(genre):
    parts = _folds(genre, 5, seed=0)
    tested = np.concatenate([test for _, _, test in parts])
    assert sorted(tested.tolist()) == list(range(len(genre.labels)))
    test_plays = []
    for train, val, test in parts:
        plays = [{genre.groups[i] for i in idx} for idx in (train, val, test)]
        assert not (plays[0] & plays[1]) and not (plays[0] & plays[2]) and not (plays[1] & plays[2])
        # Every genre is in every test fold (stratified by the plays' genres).
        assert set(genre.labels[test]) == {0, 1, 2}
        test_plays += sorted(plays[2])
    assert sorted(test_plays) == sorted(set(genre.groups))  # each play tested once


def test_loader_uses_the_fold(polarity):
    kw = dict(tokenizer="bytes", seq_len=32, max_length=40, val_fraction=0.2)
    data = load_text_data("polarity", folds=5, fold=2, **kw)
    train, val, test = kfold_split(polarity.labels, None, 5, 2, 0.2, 0)
    sizes = (len(data.train_y), len(data.val_y), len(data.test_y))
    assert sizes == (len(train), len(val), len(test))
    assert torch.equal(data.test_y, torch.from_numpy(polarity.labels[test]))
    first = data.tokenizer.decode([t for t in data.test_x[0].tolist() if t != data.pad_id])
    assert first == clean_text(polarity.texts[test[0]])[:40]
    # The default pretext corpus is the fold's training texts only: no test text in it.
    assert data.pretext_name == "polarity:train"
    with pytest.raises(ValueError, match=r"fold must be in 0\.\.4"):
        load_text_data("polarity", folds=5, fold=5, **kw)
    with pytest.raises(ValueError, match="without folds"):
        load_text_data("polarity", fold=1, **kw)
