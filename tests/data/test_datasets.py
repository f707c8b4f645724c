"""Tests for bissl.data: exact split sizes, determinism, stratification, normalisation, loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bissl.data import DATASETS, load_dataset, stratified_split


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _raw(split, data):
    """Undo the normalisation: pixels on the [0, 1] scale, float64."""
    x = split.tensors[0].double()
    mean = torch.tensor(data.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float64).view(1, -1, 1, 1)
    return x * std + mean


def test_digits_sizes_shapes_and_types(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1258, 180, 359)
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.image_size == 8
    assert digits.name == "digits" and digits.class_names == [str(d) for d in range(10)]
    for split in (digits.train, digits.val, digits.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9


def test_digits_normalised_with_train_statistics(digits):
    x = digits.train.tensors[0].double()
    assert abs(x.mean().item()) < 1e-6
    assert abs(x.std(unbiased=False).item() - 1.0) < 1e-6
    # The statistics are those of the [0, 1]-scaled training pixels (counts / 16).
    raw = _raw(digits.train, digits)
    assert raw.min().item() == pytest.approx(0.0, abs=1e-6)
    assert raw.max().item() == pytest.approx(1.0, abs=1e-6)
    counts = raw * 16
    assert torch.allclose(counts, counts.round(), atol=1e-4)  # pixel values are integer counts


def test_digits_splits_partition_the_dataset(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Multiset of (image, label) rows across splits equals the source's.
    ours = []
    for split in (digits.train, digits.val, digits.test):
        counts = (_raw(split, digits) * 16).round().long().reshape(len(split), -1)
        ours += [(*r, int(lbl)) for r, lbl in zip(counts.tolist(), split.tensors[1].tolist())]
    source = [(*r, int(lbl)) for r, lbl in zip(bunch.data.astype(int).tolist(), bunch.target)]
    assert sorted(ours) == sorted(source)


def test_digits_split_is_stratified(digits):
    total = np.bincount(np.concatenate([s.tensors[1].numpy() for s in (digits.train, digits.val, digits.test)]))
    for split, frac in ((digits.val, 0.1), (digits.test, 0.2)):
        per_class = np.bincount(split.tensors[1].numpy(), minlength=10)
        assert np.all(np.abs(per_class - frac * total) <= 1.0 + 1e-9)


def test_digits_deterministic_per_seed(digits):
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    for name in ("train", "val", "test"):
        a, b = getattr(digits, name).tensors, getattr(again, name).tensors
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (len(other.train), len(other.val), len(other.test)) == (1258, 180, 359)
    assert not torch.equal(other.test.tensors[0], digits.test.tensors[0])


def test_digits_resize():
    data = load_dataset("digits", image_size=16, val_fraction=0.2, test_fraction=0.1)
    assert data.train.tensors[0].shape[1:] == (1, 16, 16) and data.image_size == 16
    assert (len(data.val), len(data.test)) == (round(1797 * 0.2), round(1797 * 0.1))


@pytest.mark.parametrize("fractions", [(0.1, 0.2), (0.0, 0.3), (0.33,), (0.05, 0.05, 0.05)])
def test_stratified_split_exact_sizes_and_partition(fractions):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, size=503)
    parts = stratified_split(y, fractions, seed=5)
    assert [len(p) for p in parts[1:]] == [round(503 * f) for f in fractions]
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(503))
    for p, f in zip(parts[1:], fractions):
        got = np.bincount(y[p], minlength=7)
        assert np.all(np.abs(got - f * np.bincount(y, minlength=7)) <= 1.0 + 1e-9)
    again = stratified_split(y, fractions, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_stratified_split_rejects_bad_fractions():
    y = np.arange(10) % 2
    with pytest.raises(ValueError, match="sum to < 1"):
        stratified_split(y, (0.6, 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stratified_split(y, (-0.1,))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("cifar-11")
    for name in DATASETS:
        assert name in str(err.value)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("digits", root=str(tmp_path))
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("npz")
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_dataset("npz", root=str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", root=str(tmp_path))


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_uint8_nhwc_with_val(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
    x_va = rng.integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    y_tr, y_va, y_te = np.arange(20) % 3, np.array([0, 1, 2, 0]), np.array([2, 1, 0, 0, 1])
    path = _write_npz(
        tmp_path / "d.npz",
        x_train=x_tr,
        y_train=y_tr,
        x_val=x_va,
        y_val=y_va,
        x_test=x_te,
        y_test=y_te,
        class_names=np.array(["a", "b", "c"]),
    )
    data = load_dataset("npz", root=path)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 4, 5)
    assert data.num_classes == 3 and data.in_channels == 3 and data.image_size == 6
    assert data.class_names == ["a", "b", "c"]
    # Channel-first, scaled by 1/255, normalised with per-channel train statistics.
    expect = torch.from_numpy(x_te).permute(0, 3, 1, 2).double() / 255
    assert torch.allclose(_raw(data.test, data), expect, atol=1e-6)
    assert torch.equal(data.test.tensors[1], torch.from_numpy(y_te))
    train = data.train.tensors[0].double()
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-6)


def test_npz_float_nchw_carves_val(tmp_path):
    rng = np.random.default_rng(1)
    x_tr = rng.random((30, 1, 5, 5)).astype(np.float32)
    x_te = rng.random((6, 1, 5, 5)).astype(np.float32)
    path = _write_npz(
        tmp_path / "f.npz",
        x_train=x_tr,
        y_train=np.arange(30) % 2,
        x_test=x_te,
        y_test=np.arange(6) % 2,
    )
    data = load_dataset("npz", root=path, val_fraction=0.2, image_size=8)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 6)
    assert data.train.tensors[0].shape[1:] == (1, 8, 8)
    assert np.bincount(data.val.tensors[1].numpy()).tolist() == [3, 3]


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            dict(x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.zeros(4, np.int64)),
            "missing arrays",
        ),
        (
            dict(
                x_train=np.zeros((4, 3, 3), np.uint8),
                y_train=np.zeros(3, np.int64),
                x_test=np.zeros((2, 3, 3), np.uint8),
                y_test=np.zeros(2, np.int64),
            ),
            "shape",
        ),
        (
            dict(
                x_train=np.zeros((4, 3, 3), np.uint8),
                y_train=np.zeros(4, np.float32),
                x_test=np.zeros((2, 3, 3), np.uint8),
                y_test=np.zeros(2, np.int64),
            ),
            "integers",
        ),
        (
            dict(
                x_train=np.zeros((4,), np.uint8),
                y_train=np.zeros(4, np.int64),
                x_test=np.zeros((2, 3, 3), np.uint8),
                y_test=np.zeros(2, np.int64),
            ),
            "uint8 images",
        ),
        (
            dict(
                x_train=np.zeros((4, 3, 3), np.uint8),
                y_train=np.zeros(4, np.int64),
                x_test=np.zeros((2, 4, 4), np.uint8),
                y_test=np.zeros(2, np.int64),
            ),
            "differ between splits",
        ),
        (
            dict(
                x_train=np.zeros((4, 3, 5), np.uint8),
                y_train=np.zeros(4, np.int64),
                x_test=np.zeros((2, 3, 5), np.uint8),
                y_test=np.zeros(2, np.int64),
            ),
            "not square",
        ),
        (
            dict(
                x_train=np.zeros((4, 3, 3), np.uint8),
                y_train=np.zeros(4, np.int64),
                x_val=np.zeros((1, 3, 3)),
                x_test=np.zeros((2, 3, 3), np.uint8),
                y_test=np.zeros(2, np.int64),
            ),
            "together",
        ),
    ],
)
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset("npz", root=path)


def _write_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_rgb_with_test_dir(tmp_path):
    rng = np.random.default_rng(2)
    images = {}
    for split, n in (("train", 10), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                arr = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                _write_png(tmp_path / split / cls / f"{i}.png", arr)
                images[(split, cls, i)] = arr
    data = load_dataset("imagefolder", root=str(tmp_path), val_fraction=0.2)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2 and data.in_channels == 3
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 4)
    # Test files are read in sorted order: cat/0, cat/1, dog/0, dog/1.
    expect = np.stack([images[("test", c, i)] for c in ("cat", "dog") for i in range(2)])
    expect = torch.from_numpy(expect).permute(0, 3, 1, 2).double() / 255
    assert torch.allclose(_raw(data.test, data), expect, atol=1e-6)
    assert data.test.tensors[1].tolist() == [0, 0, 1, 1]


def test_imagefolder_grayscale_resized_and_split(tmp_path):
    for cls in ("0", "1", "2"):
        for i in range(10):
            _write_png(tmp_path / "train" / cls / f"{i}.png", np.full((5, 7), 40 * int(cls), np.uint8))
    data = load_dataset("imagefolder", root=str(tmp_path), image_size=6)
    assert data.in_channels == 1 and data.image_size == 6
    assert (len(data.train), len(data.val), len(data.test)) == (21, 3, 6)
    # A constant image stays constant through the resize.
    raw = _raw(data.test, data)
    lbl = data.test.tensors[1].double().view(-1, 1, 1, 1)
    assert torch.allclose(raw, (40 * lbl / 255).expand_as(raw), atol=1e-6)


def test_imagefolder_errors(tmp_path):
    _write_png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _write_png(tmp_path / "train" / "a" / "1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", root=str(tmp_path))
    _write_png(tmp_path / "val" / "zebra" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="zebra"):
        load_dataset("imagefolder", root=str(tmp_path), image_size=4)
