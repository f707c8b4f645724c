"""digits_lowlabel and digits_transfer: sizes, label counts, disjointness, determinism, the pretext
images they bring, normalisation, and the config keys that select them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bissl.config import load_config
from bissl.data import load_dataset, stratified_split
from bissl.data.digits_tasks import lowlabel_split, read_digits, transfer_split
from bissl.data.options import image_task_options, text_task_options


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return read_digits()[1].numpy()


def _pixels(x: torch.Tensor, data) -> set[tuple[int, ...]]:
    """Each image as a tuple of its 64 integer counts (the 1,797 digits images are all distinct)."""
    mean = torch.tensor(data.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float64).view(1, -1, 1, 1)
    counts = ((x.double() * std + mean) * 16).round().long().reshape(len(x), -1)
    return {tuple(r) for r in counts.tolist()}


# --------------------------------------------------------------------------- low-label
def test_lowlabel_indices(labels):
    train, val, test, pool = lowlabel_split(labels, 0.1, 0.5, 10, seed=0)
    assert (len(train), len(val), len(test), len(pool)) == (100, 180, 898, 719)
    assert np.bincount(labels[train]).tolist() == [10] * 10
    # The parts partition the dataset; the labelled images are part of the pretext pool.
    assert sorted(np.concatenate([pool, val, test]).tolist()) == list(range(len(labels)))
    assert set(train) <= set(pool)
    # Validation and test are the plain digits task's (drawn without touching each other).
    _, val_d, test_d = stratified_split(labels, (0.1, 0.5), seed=0)
    assert np.array_equal(val, val_d) and np.array_equal(test, test_d)


def test_lowlabel_is_deterministic_given_the_split_seed(labels):
    a, b = lowlabel_split(labels, 0.1, 0.5, 10, 3), lowlabel_split(labels, 0.1, 0.5, 10, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = lowlabel_split(labels, 0.1, 0.5, 10, 4)
    assert not np.array_equal(a[0], other[0]) and not np.array_equal(a[2], other[2])


def test_lowlabel_dataset_images_match_the_indices(labels):
    data = load_dataset("digits_lowlabel", val_fraction=0.1, test_fraction=0.5, labels_per_class=10, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (100, 180, 898)
    assert data.unlabelled.shape == (719, 1, 8, 8) and data.unlabelled.dtype == torch.float32
    train, val, test, pool = (
        _pixels(s, data) for s in (data.train.tensors[0], data.val.tensors[0], data.test.tensors[0], data.unlabelled)
    )
    assert train <= pool and not (pool & val) and not (pool & test) and not (val & test)
    assert torch.bincount(data.train.tensors[1]).tolist() == [10] * 10
    # Normalised with the pretext pool's statistics: it has mean 0, std 1.
    u = data.unlabelled.double()
    assert abs(u.mean().item()) < 1e-6 and abs(u.std(unbiased=False).item() - 1) < 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs labels_per_class"),
        ({"labels_per_class": 200}, "fewer than the 200"),
        ({"labels_per_class": 5, "pretext_classes": [0]}, "pretext_classes is an option of digits_transfer"),
        ({"labels_per_class": 5, "root": "x"}, "takes no root"),
    ],
)
def test_lowlabel_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("digits_lowlabel", **kwargs)


def test_plain_digits_refuses_task_options():
    with pytest.raises(
        ValueError,
        match="labels_per_class is an option of digits_lowlabel, digits_transfer; dataset 'digits' does not take it",
    ):
        load_dataset("digits", labels_per_class=10)


# --------------------------------------------------------------------------- transfer
def test_transfer_indices(labels):
    pretext, train, val, test = transfer_split(labels, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], 0.1, 0.2, None, seed=0)
    assert set(labels[pretext]) == {0, 1, 2, 3, 4} and set(labels[train]) == {5, 6, 7, 8, 9}
    assert len(pretext) == int(np.isin(labels, [0, 1, 2, 3, 4]).sum()) == 901
    down = np.flatnonzero(labels >= 5)
    assert (len(train), len(val), len(test)) == (627, 90, 179)  # round(896·0.1), round(896·0.2)
    assert sorted(np.concatenate([train, val, test]).tolist()) == down.tolist()
    counts = np.bincount(labels[test], minlength=10)[5:]
    assert counts.max() - counts.min() <= 1  # stratified
    few = transfer_split(labels, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], 0.1, 0.2, 7, seed=0)
    assert np.bincount(labels[few[1]], minlength=10)[5:].tolist() == [7] * 5
    assert set(few[1]) <= set(train) and np.array_equal(few[3], test)


def test_transfer_dataset(labels):
    data = load_dataset("digits_transfer", labels_per_class=7, seed=2)
    assert data.num_classes == 5 and data.class_names == ["5", "6", "7", "8", "9"]
    assert torch.bincount(data.train.tensors[1]).tolist() == [7] * 5
    pretext, _, _, test = transfer_split(labels, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], 0.1, 0.2, 7, 2)
    x, y = read_digits()
    # Images and relabelled targets are those of the indices (label 5 -> 0, ..., 9 -> 4).
    raw = _pixels(data.test.tensors[0], data)
    assert raw == {tuple((x[i].reshape(-1) * 16).round().long().tolist()) for i in test}
    assert sorted(data.test.tensors[1].tolist()) == sorted((y[test] - 5).tolist())
    assert len(data.unlabelled) == len(pretext)
    assert not (_pixels(data.unlabelled, data) & (raw | _pixels(data.train.tensors[0], data)))


def test_transfer_custom_classes_and_errors(labels):
    data = load_dataset("digits_transfer", pretext_classes=[1, 7], downstream_classes=[9, 3])
    assert data.class_names == ["9", "3"]
    assert set(data.train.tensors[1].tolist()) == {0, 1}
    for kwargs, match in [
        ({"pretext_classes": [0, 5], "downstream_classes": [5, 6]}, "share \\[5\\]"),
        ({"downstream_classes": [5]}, "at least two"),
        ({"pretext_classes": [10]}, "digits 0-9"),
        ({"pretext_classes": [1, 1]}, "repeats"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_dataset("digits_transfer", **kwargs)


# --------------------------------------------------------------------------- config and pipeline
def test_config_keys_reach_the_loader():
    from bissl.trainer.experiment import load_pipeline_data

    cfg = load_config(
        None,
        ["data.name=digits_lowlabel", "data.labels_per_class=10", "data.test_fraction=0.5", "model.backbone=small_cnn"],
    )
    data = load_pipeline_data(cfg)
    assert tuple(data.train_x.shape) == (100, 1, 8, 8) and len(data.test_y) == 898
    assert tuple(data.pretext_x.shape) == (719, 1, 8, 8)  # the pool, not the 100 labelled images
    cfg = load_config(None, ["data.name=digits_transfer", "model.backbone=small_cnn"])
    data = load_pipeline_data(cfg)
    assert len(data.pretext_x) == 901 and data.num_classes == 5


def test_task_keys_of_the_other_kind_are_refused():
    from bissl.config import ConfigError
    from bissl.trainer.experiment import load_pipeline_data

    img = load_config(None, ["data.folds=5"]).data
    with pytest.raises(ValueError, match=r"data\.folds is not used by image tasks"):
        image_task_options(img)
    with pytest.raises(ValueError, match="k-fold splits exist for text tasks only"):
        image_task_options(load_config(None, ["data.fold=1"]).data)
    with pytest.raises(ValueError, match=r"data\.labels_per_class is not used by text tasks"):
        text_task_options(load_config(None, ["data.labels_per_class=3"]).data)
    cfg = load_config(None, ["data.name=digits_lowlabel", "data.labels_per_class=10", "data.pretext_name=digits"])
    with pytest.raises(ConfigError, match="brings its own pretext images"):
        load_pipeline_data(cfg)
