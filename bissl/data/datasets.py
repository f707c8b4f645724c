"""Offline, real labelled image datasets for BiSSL: ``load_dataset(name, ...)``.

Provenance (nothing is ever downloaded):

* ``"digits"`` (built-in default): scikit-learn's ``load_digits``, the 1,797-image test set of the
  UCI ML "Optical Recognition of Handwritten Digits" data (E. Alpaydin, C. Kaynak, 1998), shipped
  inside the scikit-learn wheel. Each image is an 8x8 grid of counts 0..16 (on-pixels of a 32x32
  NIST-preprocessed bitmap per 4x4 block) of one handwritten digit; 10 classes of 174..183 images
  written by 13 people. We scale counts to ``[0, 1]`` by dividing by 16. With the default fractions
  (val 0.1, test 0.2) the stratified split has exactly **1,258 train / 180 val / 359 test** images
  for every seed (the seed changes which images, not how many).
* ``"digits_lowlabel"``, ``"digits_transfer"``: few labels, or a class split, cut from the same
  digits (:mod:`bissl.data.digits_tasks`); they bring their own pretext images
  (``DatasetSplits.unlabelled``) and take the task options of :func:`load_dataset`.
* ``"npz"``: a user-provided ``.npz`` file (``root``) with ``x_train, y_train, x_test, y_test`` and
  optionally ``x_val, y_val`` and ``class_names`` — e.g. CIFAR-10 or STL-10 arrays saved with
  ``numpy.savez``. Images are ``uint8`` ``(N, H, W, C)`` or ``(N, H, W)`` (divided by 255), or float
  ``(N, C, H, W)`` / ``(N, H, W)`` already on the ``[0, 1]`` scale. Without ``x_val`` the validation
  split is carved, stratified, from the training arrays (``val_fraction`` of them).
* ``"imagefolder"``: a user-provided directory ``root/train/<class>/*.png|jpg|jpeg`` and optionally
  ``root/val/<class>/...`` and ``root/test/<class>/...``, read with Pillow. Class names are the
  sorted ``train`` sub-directory names. A missing ``val``/``test`` is carved from ``train``. Images
  become 1-channel when every file is grayscale, else RGB.

All splits are normalised with the training split's per-channel mean/std (``DatasetSplits.mean``
and ``.std`` keep them). See :mod:`bissl.data.splits` for the exact split rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from bissl.data.digits_tasks import load_digits_lowlabel, load_digits_transfer, read_digits
from bissl.data.splits import DatasetSplits, build_splits, resize_images, stratified_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow modes that carry one intensity channel (no colour, no alpha).
_GRAYSCALE_MODES = ("1", "L", "I", "I;16", "F")


def _to_tensor_images(x: np.ndarray, key: str) -> Tensor:
    """``uint8 (N,H,W[,C])`` or float ``(N,[C,]H,W)`` -> float32 ``(N, C, H, W)`` on [0, 1]."""
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"{key}: uint8 images must be (N, H, W, C) or (N, H, W), got shape {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"{key}: float images must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{key}: float images contain NaN or Inf")
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    raise ValueError(f"{key}: images must be uint8 or floating point, got dtype {x.dtype}")


def _to_tensor_labels(y: np.ndarray, key: str, n: int) -> Tensor:
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{key}: labels must be integers, got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{key}: labels must have shape ({n},) to match the images, got {y.shape}")
    if n and y.min() < 0:
        raise ValueError(f"{key}: labels must be >= 0, got minimum {y.min()}")
    return torch.from_numpy(y.astype(np.int64))


def _square(x: Tensor, image_size: int | None, what: str) -> Tensor:
    """Resize to ``image_size`` if given; otherwise require square images."""
    if image_size is not None:
        return resize_images(x, image_size)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{what}: images are {tuple(x.shape[-2:])} (not square); pass image_size")
    return x


def _fill_missing_splits(
    x_train: Tensor,
    y_train: Tensor,
    val: tuple[Tensor, Tensor] | None,
    test: tuple[Tensor, Tensor] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Carve the missing val/test splits out of the training pool (stratified, exact sizes)."""
    fractions = ([] if val is not None else [val_fraction]) + ([] if test is not None else [test_fraction])
    if fractions:
        rest, *parts = stratified_split(y_train.numpy(), fractions, seed=seed)
        carved = [(x_train[torch.from_numpy(i)], y_train[torch.from_numpy(i)]) for i in parts]
        if val is None:
            val = carved.pop(0)
        if test is None:
            test = carved.pop(0)
        x_train, y_train = x_train[torch.from_numpy(rest)], y_train[torch.from_numpy(rest)]
    assert val is not None and test is not None  # given, or carved just above
    return x_train, y_train, val[0], val[1], test[0], test[1]


def _load_digits(
    root: str | None, val_fraction: float, test_fraction: float, seed: int, image_size: int | None
) -> DatasetSplits:
    if root is not None:
        raise ValueError("dataset 'digits' is built into scikit-learn and takes no root path")
    x, y = read_digits(image_size)
    splits = _fill_missing_splits(x, y, None, None, val_fraction, test_fraction, seed)
    return build_splits("digits", *splits, num_classes=10, class_names=[str(d) for d in range(10)])


def _load_npz(
    root: str | None, val_fraction: float, test_fraction: float, seed: int, image_size: int | None
) -> DatasetSplits:
    if root is None:
        raise ValueError("dataset 'npz' needs root= the path of an .npz file")
    if not os.path.isfile(root):
        raise FileNotFoundError(f"dataset 'npz': no such file {root!r}")
    with np.load(root, allow_pickle=False) as arrays:
        keys = set(arrays.files)
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in keys]
        if missing:
            raise ValueError(
                f"{root}: missing arrays {missing}; found {sorted(keys)} "
                "(need x_train, y_train, x_test, y_test; optional x_val, y_val)"
            )
        if ("x_val" in keys) != ("y_val" in keys):
            raise ValueError(f"{root}: x_val and y_val must be given together, found {sorted(keys)}")
        loaded = {}
        for split in ("train", "val", "test"):
            if f"x_{split}" not in keys:
                continue
            x = _to_tensor_images(arrays[f"x_{split}"], f"x_{split}")
            y = _to_tensor_labels(arrays[f"y_{split}"], f"y_{split}", x.shape[0])
            loaded[split] = (_square(x, image_size, f"{root} x_{split}"), y)
        class_names = [str(c) for c in arrays["class_names"]] if "class_names" in keys else None
    shapes = {split: tuple(x.shape[1:]) for split, (x, _) in loaded.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{root}: image shapes (C, H, W) differ between splits: {shapes}")
    if loaded["train"][0].shape[0] == 0:
        raise ValueError(f"{root}: x_train is empty")
    num_classes = 1 + max(int(y.max()) for _, y in loaded.values() if y.numel())
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{root}: {len(class_names)} class_names for {num_classes} classes")
    splits = _fill_missing_splits(
        *loaded["train"], loaded.get("val"), loaded["test"], val_fraction, test_fraction, seed
    )
    return build_splits("npz", *splits, num_classes=num_classes, class_names=class_names)


def _list_images(split_dir: str, class_names: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    """Files and labels under ``split_dir/<class>/``; classes from the dir unless given."""
    found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if class_names is None:
        class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{split_dir}: classes {unknown} do not appear in the train split {class_names}")
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        cls_dir = os.path.join(split_dir, cls)
        if not os.path.isdir(cls_dir):
            continue
        for fname in sorted(os.listdir(cls_dir)):
            if fname.lower().endswith(IMAGE_SUFFIXES):
                paths.append(os.path.join(cls_dir, fname))
                labels.append(label)
    if not paths:
        raise ValueError(f"{split_dir}: no {'/'.join(IMAGE_SUFFIXES)} images in class sub-directories")
    return paths, labels, class_names


def _read_images(paths: list[str], grayscale: bool, image_size: int | None) -> Tensor:
    """Read image files into float32 ``(N, C, S, S)`` on [0, 1] (Pillow bilinear resize)."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB")
            if image_size is not None and img.size != (image_size, image_size):
                # Image.BILINEAR works with every Pillow; its typing lists only Image.Resampling (9.1+).
                img = img.resize((image_size, image_size), Image.BILINEAR)  # type: ignore[attr-defined]
            arrays.append(np.asarray(img, dtype=np.uint8))
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        raise ValueError(f"images have sizes {sizes[:5]} (H, W); pass image_size to resize them to one square size")
    return _to_tensor_images(np.stack(arrays), "imagefolder")


def _load_imagefolder(
    root: str | None, val_fraction: float, test_fraction: float, seed: int, image_size: int | None
) -> DatasetSplits:
    from PIL import Image

    if root is None:
        raise ValueError("dataset 'imagefolder' needs root= a directory with train/<class>/ images")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(
            f"dataset 'imagefolder': no directory {train_dir!r} (expected root/train/<class>/*.png|jpg)"
        )
    listed = {}
    paths, labels, class_names = _list_images(train_dir, None)
    listed["train"] = (paths, labels)
    for split in ("val", "test"):
        split_dir = os.path.join(root, split)
        if os.path.isdir(split_dir):
            p, lab, _ = _list_images(split_dir, class_names)
            listed[split] = (p, lab)
    # One channel layout for all splits: grayscale only when every image is grayscale.
    grayscale = True
    for p, _ in listed.values():
        for path in p:
            with Image.open(path) as img:
                if img.mode not in _GRAYSCALE_MODES:
                    grayscale = False
                    break
        if not grayscale:
            break
    loaded = {
        split: (_read_images(p, grayscale, image_size), torch.tensor(lab, dtype=torch.int64))
        for split, (p, lab) in listed.items()
    }
    shapes = {split: tuple(x.shape[1:]) for split, (x, _) in loaded.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{root}: image shapes (C, H, W) differ between splits: {shapes}; pass image_size")
    splits = _fill_missing_splits(
        *loaded["train"], loaded.get("val"), loaded.get("test"), val_fraction, test_fraction, seed
    )
    return build_splits("imagefolder", *splits, num_classes=len(class_names), class_names=class_names)


_LOADERS: dict[str, Callable[..., DatasetSplits]] = {
    "digits": _load_digits,
    "digits_lowlabel": load_digits_lowlabel,
    "digits_transfer": load_digits_transfer,
    "imagefolder": _load_imagefolder,
    "npz": _load_npz,
}
#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = tuple(sorted(_LOADERS))
#: The task options of :func:`load_dataset` each dataset takes (config keys ``data.<option>``).
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits_lowlabel": ("labels_per_class",),
    "digits_transfer": ("labels_per_class", "pretext_classes", "downstream_classes"),
}


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    labels_per_class: int | None = None,
    pretext_classes: Sequence[int] | None = None,
    downstream_classes: Sequence[int] | None = None,
) -> DatasetSplits:
    """Load a labelled image dataset as normalised train/val/test tensors.

    Args:
        name: ``"digits"`` (built in, default choice), ``"digits_lowlabel"``,
            ``"digits_transfer"``, ``"npz"`` or ``"imagefolder"``.
        root: ``.npz`` path (``"npz"``) or directory (``"imagefolder"``); must be None for digits.
        val_fraction: fraction of the split pool carved out for validation when the source has no
            validation split (digits: of all 1,797 images; npz/imagefolder: of the training set).
        test_fraction: same for the test split (npz always has one, so it is unused there).
        seed: which samples go where (sizes do not depend on it).
        image_size: resize to ``image_size x image_size`` (bilinear); None keeps the native size
            (8 for digits), which must then be square.
        labels_per_class: labelled training images per class (``digits_lowlabel``: required;
            ``digits_transfer``: optional, default every training image).
        pretext_classes, downstream_classes: the two sides of ``digits_transfer`` (default 0-4
            and 5-9).

    Returns:
        :class:`DatasetSplits`; ``x`` float32 ``(N, C, S, S)``, ``y`` int64 ``(N,)``.

    Raises:
        ValueError: unknown name (the message lists valid names), bad fractions, missing or
            malformed arrays, mismatched shapes, a task option the dataset does not take.
        FileNotFoundError: ``root`` does not exist.

    Example:
        >>> data = load_dataset("digits")
        >>> len(data.train), len(data.val), len(data.test)
        (1258, 180, 359)
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    for label, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{label} must lie in [0, 1), got {frac}")
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    given = {
        k: v
        for k, v in (
            ("labels_per_class", labels_per_class),
            ("pretext_classes", pretext_classes),
            ("downstream_classes", downstream_classes),
        )
        if v is not None
    }
    accepted = TASK_OPTIONS.get(name, ())
    for key in given:
        if key not in accepted:
            users = sorted(n for n, opts in TASK_OPTIONS.items() if key in opts)
            raise ValueError(f"{key} is an option of {', '.join(users)}; dataset {name!r} does not take it")
    return _LOADERS[name](root, val_fraction, test_fraction, seed, image_size, **given)
