"""Harder tasks cut from scikit-learn's 8x8 digits, where a read-out can see the backbone.

The plain ``digits`` task saturates (about 98% test accuracy with 1,258 labelled images), so
differences between backbones hardly show. Two shipped variants leave room:

* ``"digits_lowlabel"``: few labels. The 1,797 images are split as ``digits`` is
  (:func:`bissl.data.splits.stratified_split`: exactly ``round(N·val_fraction)`` validation and
  ``round(N·test_fraction)`` test images, stratified, fixed by ``split_seed``). Of the remaining
  *pool*, ``labels_per_class`` images per class are the labelled training set
  (:func:`~bissl.data.splits.per_class_subset`, seeded by ``(split_seed, 1)``); the whole pool,
  labels unused, is the pretext set (``DatasetSplits.unlabelled``). Validation and test images are
  never in the pretext set and never in training; validation is drawn without touching test.
  Example: ``test_fraction 0.5``, ``val_fraction 0.1``, ``labels_per_class 10`` gives 100 train /
  180 val / 898 test images and 719 pretext images.
* ``"digits_transfer"``: a class split. The pretext set is every image of ``pretext_classes``
  (default 0-4); the downstream task classifies ``downstream_classes`` (default 5-9, relabelled
  ``0..k-1`` in the given order), split train/val/test like ``digits`` within those images. The
  backbone never sees a downstream class during pretraining. ``labels_per_class`` (optional)
  keeps only that many training images per class (low-label transfer); the others are unused.

Both normalise every split with the per-channel statistics of the pretext images (the input
distribution the backbone is pretrained on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bissl.data.splits import (
    DatasetSplits,
    build_splits,
    per_class_subset,
    resize_images,
    stratified_split,
)

#: Digit classes of the transfer task's two sides, by default.
TRANSFER_PRETEXT_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
TRANSFER_DOWNSTREAM_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)
#: Second seed component of the labelled subset (the first is ``split_seed``): a stream apart from
#: the split's own shuffles.
_LABELLED_STREAM = 1


def read_digits(image_size: int | None = None) -> tuple[Tensor, Tensor]:
    """All 1,797 digits: float32 images ``(N, 1, S, S)`` on ``[0, 1]`` (counts / 16) and int64
    labels ``(N,)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    if image_size is not None:
        x = resize_images(x, image_size)
    return x, y


def _take(x: Tensor, y: Tensor, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    index = torch.from_numpy(idx)
    return x[index], y[index]


def lowlabel_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, labels_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(train, val, test, pool)`` of ``digits_lowlabel`` (module docstring).

    ``val`` and ``test`` are exactly the :func:`stratified_split` parts of ``labels`` (so ``test``
    and ``val`` are the same as the ``digits`` task's for the same fractions and seed); ``pool``
    is the rest; ``train ⊂ pool`` has ``labels_per_class`` per class. All sorted int64.

    Raises:
        ValueError: a class's pool is smaller than ``labels_per_class``.
    """
    labels = np.asarray(labels)
    pool, val, test = stratified_split(labels, (val_fraction, test_fraction), seed=seed)
    try:
        train = pool[per_class_subset(labels[pool], labels_per_class, (seed, _LABELLED_STREAM))]
    except ValueError as err:
        raise ValueError(
            f"labels_per_class {labels_per_class}: {err} in the pool left after the val/test split"
        ) from None
    return train, val, test, pool


def load_digits_lowlabel(
    root: str | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    image_size: int | None,
    *,
    labels_per_class: int | None = None,
) -> DatasetSplits:
    """``digits_lowlabel`` (see the module docstring).

    Raises:
        ValueError: a root path, ``labels_per_class`` missing or larger than a class's pool.
    """
    if root is not None:
        raise ValueError("dataset 'digits_lowlabel' is built into scikit-learn and takes no root path")
    if labels_per_class is None:
        raise ValueError(
            "dataset 'digits_lowlabel' needs labels_per_class "
            "(data.labels_per_class), the labelled training images per class"
        )
    x, y = read_digits(image_size)
    try:
        train, val, test, pool = lowlabel_split(y.numpy(), val_fraction, test_fraction, labels_per_class, seed)
    except ValueError as err:
        raise ValueError(f"dataset 'digits_lowlabel': {err}") from None
    return build_splits(
        "digits_lowlabel",
        *_take(x, y, train),
        *_take(x, y, val),
        *_take(x, y, test),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        unlabelled=x[torch.from_numpy(pool)],
    )


def _check_classes(classes: Sequence[int], key: str) -> list[int]:
    out = [int(c) for c in classes]
    if not out:
        raise ValueError(f"{key} must not be empty")
    bad = [c for c in out if not 0 <= c <= 9]
    if bad:
        raise ValueError(f"{key} must be digits 0-9, got {bad}")
    if len(set(out)) != len(out):
        raise ValueError(f"{key} repeats a class: {out}")
    return out


def transfer_split(
    labels: np.ndarray,
    pretext_classes: Sequence[int],
    downstream_classes: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    labels_per_class: int | None,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Indices ``(pretext, train, val, test)`` of ``digits_transfer`` into ``labels`` (all digits).

    ``pretext`` is every index of ``pretext_classes``; ``train/val/test`` are the
    :func:`stratified_split` of the ``downstream_classes`` indices, ``train`` cut to
    ``labels_per_class`` per class when given. All sorted int64.

    Raises:
        ValueError: bad or shared classes, fewer than two downstream classes, or
            ``labels_per_class`` above a class's training images.
    """
    pre = _check_classes(pretext_classes, "pretext_classes")
    down = _check_classes(downstream_classes, "downstream_classes")
    shared = sorted(set(pre) & set(down))
    if shared:
        raise ValueError(
            f"pretext_classes and downstream_classes share {shared}; a transfer split "
            "keeps the downstream classes out of pretraining"
        )
    if len(down) < 2:
        raise ValueError(f"downstream_classes needs at least two classes, got {down}")
    labels = np.asarray(labels)
    keep = np.flatnonzero(np.isin(labels, down))
    parts = stratified_split(labels[keep], (val_fraction, test_fraction), seed=seed)
    train, val, test = (keep[i] for i in parts)
    if labels_per_class is not None:
        try:
            train = train[per_class_subset(labels[train], labels_per_class, (seed, _LABELLED_STREAM))]
        except ValueError as err:
            raise ValueError(f"labels_per_class {labels_per_class}: {err} in the training split") from None
    return np.flatnonzero(np.isin(labels, pre)).astype(np.int64), train, val, test


def load_digits_transfer(
    root: str | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    image_size: int | None,
    *,
    labels_per_class: int | None = None,
    pretext_classes: Sequence[int] | None = None,
    downstream_classes: Sequence[int] | None = None,
) -> DatasetSplits:
    """``digits_transfer`` (see the module docstring and :func:`transfer_split`).

    Raises:
        ValueError: a root path, or the errors of :func:`transfer_split`.
    """
    if root is not None:
        raise ValueError("dataset 'digits_transfer' is built into scikit-learn and takes no root path")
    pre = list(TRANSFER_PRETEXT_CLASSES if pretext_classes is None else pretext_classes)
    down = list(TRANSFER_DOWNSTREAM_CLASSES if downstream_classes is None else downstream_classes)
    x, y = read_digits(image_size)
    try:
        pretext, train, val, test = transfer_split(
            y.numpy(), pre, down, val_fraction, test_fraction, labels_per_class, seed
        )
    except ValueError as err:
        raise ValueError(f"dataset 'digits_transfer': {err}") from None
    relabel = torch.full((10,), -1, dtype=torch.int64)
    relabel[torch.tensor(down)] = torch.arange(len(down))
    yd = relabel[y]
    return build_splits(
        "digits_transfer",
        *_take(x, yd, train),
        *_take(x, yd, val),
        *_take(x, yd, test),
        num_classes=len(down),
        class_names=[str(c) for c in down],
        unlabelled=x[torch.from_numpy(pretext)],
    )
