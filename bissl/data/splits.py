"""Dataset container, stratified splitting and normalisation shared by every loader.

Split rule (used by all loaders, so sizes are predictable): a pool of ``N`` labelled samples is cut
into parts whose totals are exactly ``round(N * fraction)``; each total is shared among the classes
in proportion to the class sizes by the largest-remainder method, so every part is stratified to
within one sample per class. Within a class the samples are shuffled with
``numpy.random.default_rng(seed)``; the same labels and seed always give the same indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset


@dataclass
class DatasetSplits:
    """Train/val/test splits of one labelled image dataset, ready for training.

    Attributes:
        train, val, test: ``TensorDataset`` of ``(x, y)``; ``x`` float32 ``(N, C, H, W)`` normalised
            with the train split's per-channel mean/std; ``y`` int64 ``(N,)`` in
            ``[0, num_classes)``.
        num_classes: number of classes.
        in_channels: ``C`` (1 for grayscale, 3 for RGB).
        image_size: ``H == W``.
        name: dataset name (``"digits"``, ``"npz"``, ``"imagefolder"``).
        class_names: class names in label order, when the source has them.
        mean, std: the per-channel statistics used for normalisation, on the ``[0, 1]`` pixel scale
            (``x_raw = x * std + mean``); augmentations that assume ``[0, 1]`` pixels need them.
        unlabelled: ``(N_u, C, H, W)`` pretext images that come with the task (normalised like the
            splits, with the same statistics), or None: the pretext set is then the train split
            (or a separately named pretext dataset). Tasks that set it never include val or test
            images in it.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    class_names: list[str] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    unlabelled: Tensor | None = None


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` (summing exactly to ``total``)."""
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = total * weights / weights.sum()
    shares = np.floor(exact).astype(np.int64)
    short = total - int(shares.sum())
    # Ties broken by class index (stable sort) so the allocation is deterministic.
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:short]] += 1
    return shares


def stratified_split(labels: np.ndarray | Tensor, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Cut sample indices into stratified parts of exact sizes.

    Args:
        labels: ``(N,)`` integer class labels.
        fractions: fraction of ``N`` for each carved-out part (e.g. ``(val, test)``); each part gets
            exactly ``round(N * fraction)`` samples. Their sum must be < 1.
        seed: shuffling seed within each class.

    Returns:
        ``[rest, part_0, part_1, ...]``: sorted int64 index arrays that partition ``range(N)``;
        ``rest`` holds what the parts do not take (the training set, usually).

    Raises:
        ValueError: fractions outside ``[0, 1)``, summing to ``>= 1``, or leaving ``rest`` empty.
    """
    y = np.asarray(labels).reshape(-1)
    n = y.shape[0]
    for f in fractions:
        if not 0.0 <= f < 1.0:
            raise ValueError(f"split fractions must lie in [0, 1), got {list(fractions)}")
    if sum(fractions) >= 1.0:
        raise ValueError(f"split fractions must sum to < 1, got {list(fractions)} (sum {sum(fractions)})")
    classes, inverse = np.unique(y, return_inverse=True)
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(classes))]
    class_sizes = np.array([len(m) for m in members], dtype=np.float64)
    remaining = class_sizes.copy()
    taken = np.zeros(len(classes), dtype=np.int64)
    parts = []
    for f in fractions:
        # Each part is shared in proportion to what is still available per class, never more.
        shares = np.minimum(_largest_remainder(round(float(n * f)), remaining), remaining.astype(np.int64))
        parts.append(
            np.sort(np.concatenate([m[t : t + s] for m, t, s in zip(members, taken, shares)])).astype(np.int64)
        )
        taken += shares
        remaining -= shares
    rest = np.sort(np.concatenate([m[t:] for m, t in zip(members, taken)])).astype(np.int64)
    if rest.size == 0:
        raise ValueError(f"split fractions {list(fractions)} leave no samples for training (N={n})")
    return [rest, *parts]


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    return np.random.default_rng(list(seed) if isinstance(seed, (list, tuple)) else seed)


def per_class_subset(labels: np.ndarray | Tensor, per_class: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """Indices of ``per_class`` samples of every class, drawn without replacement.

    Within a class the samples are shuffled with ``numpy.random.default_rng(seed)`` (classes in
    ascending label order) and the first ``per_class`` kept.

    Returns:
        sorted int64 indices into ``labels``, ``per_class × (number of classes)`` of them.

    Raises:
        ValueError: ``per_class < 1`` or a class with fewer than ``per_class`` samples.
    """
    y = np.asarray(labels).reshape(-1)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = _rng(seed)
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if members.size < per_class:
            raise ValueError(f"class {int(c)} has {members.size} samples, fewer than the {per_class} asked for")
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def kfold_assignment(labels: np.ndarray | Tensor, folds: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """Stratified k-fold: the fold ``0..folds-1`` of every sample.

    The samples of each class are shuffled with ``numpy.random.default_rng(seed)``, the classes
    are concatenated in ascending label order and position ``i`` of that list goes to fold
    ``i mod folds``. So each fold holds ``⌊n_c/k⌋`` or ``⌈n_c/k⌉`` samples of every class ``c`` and
    fold sizes differ by at most one; every sample is in exactly one fold.

    Raises:
        ValueError: ``folds < 2`` or more folds than samples.
    """
    y = np.asarray(labels).reshape(-1)
    if folds < 2:
        raise ValueError(f"k-fold needs folds >= 2, got {folds}")
    if folds > y.size:
        raise ValueError(f"{folds} folds for {y.size} samples: a fold would be empty")
    rng = _rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    fold_of = np.empty(y.size, dtype=np.int64)
    fold_of[order] = np.arange(y.size) % folds
    return fold_of


def resize_images(x: Tensor, image_size: int) -> Tensor:
    """Bilinear resize of ``(N, C, H, W)`` float images to ``(N, C, image_size, image_size)``."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if x.shape[-2:] == (image_size, image_size):
        return x
    # antialias only matters when shrinking; it keeps downscaled images from aliasing.
    shrink = image_size < max(x.shape[-2:])
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``(N, C, H, W)`` images (float64 accumulation), each ``(C,)``.

    A channel with zero spread gets std 1 so normalisation never divides by zero.
    """
    xd = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    mean = xd.mean(dim=1)
    std = xd.std(dim=1, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean, std


def build_splits(
    name: str,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    num_classes: int,
    class_names: list[str] | None = None,
    unlabelled: Tensor | None = None,
) -> DatasetSplits:
    """Normalise ``[0, 1]``-scaled images with train statistics; pack them as ``DatasetSplits``.

    Args:
        x_*: float ``(N, C, S, S)`` images on the ``[0, 1]`` scale.
        y_*: integer ``(N,)`` labels in ``[0, num_classes)``.
        unlabelled: optional ``(N_u, C, S, S)`` pretext images on the ``[0, 1]`` scale. When given,
            the statistics come from them (the larger set, and the input distribution the backbone
            is pretrained on) and every split is normalised with those.
    """
    mean, std = channel_stats(x_train if unlabelled is None else unlabelled)
    shape = (1, -1, 1, 1)

    def norm(x: Tensor) -> Tensor:
        return ((x.to(torch.float64) - mean.view(shape)) / std.view(shape)).to(torch.float32).contiguous()

    def labels(y: Tensor) -> Tensor:
        return torch.as_tensor(y, dtype=torch.int64).reshape(-1)

    return DatasetSplits(
        train=TensorDataset(norm(x_train), labels(y_train)),
        val=TensorDataset(norm(x_val), labels(y_val)),
        test=TensorDataset(norm(x_test), labels(y_test)),
        num_classes=num_classes,
        in_channels=int(x_train.shape[1]),
        image_size=int(x_train.shape[-1]),
        name=name,
        class_names=class_names,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        unlabelled=None if unlabelled is None else norm(unlabelled),
    )
