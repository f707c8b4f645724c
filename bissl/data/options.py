"""The task options of ``cfg.data`` each loader takes: one place that maps the config's data keys
to :func:`bissl.data.load_dataset` (images) or :func:`bissl.data.text.load_text_data` (text), and
refuses keys that belong to the other kind of task (they would otherwise be silently unused)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

#: Keys that only image tasks read, and only text tasks.
IMAGE_ONLY = ("labels_per_class", "pretext_classes", "downstream_classes")
TEXT_ONLY = ("folds",)
#: Text-only switches (booleans; refused when true for an image task).
TEXT_ONLY_FLAGS = ("fold_by_seed",)


class DataKeys(Protocol):
    """The part of :class:`bissl.config.DataConfig` read here (read-only)."""

    @property
    def labels_per_class(self) -> int | None: ...
    @property
    def pretext_classes(self) -> Sequence[int] | None: ...
    @property
    def downstream_classes(self) -> Sequence[int] | None: ...
    @property
    def folds(self) -> int | None: ...
    @property
    def fold(self) -> int: ...
    @property
    def fold_by_seed(self) -> bool: ...
    @property
    def split_seed(self) -> int: ...


def _refuse(d: DataKeys, keys: Sequence[str], kind: str) -> None:
    given = [f"data.{k}" for k in keys if getattr(d, k) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not used by "
            f"{kind} tasks; remove {'it' if len(given) == 1 else 'them'}"
        )


def image_task_options(d: DataKeys) -> dict[str, Any]:
    """Keyword arguments of :func:`bissl.data.load_dataset` beyond the split fractions.

    Raises:
        ValueError: a text-only key is set.
    """
    _refuse(d, TEXT_ONLY, "image")
    if d.fold != 0:
        raise ValueError(f"data.fold is {d.fold} but k-fold splits exist for text tasks only")
    for flag in TEXT_ONLY_FLAGS:
        if getattr(d, flag):
            raise ValueError(f"data.{flag} is set but k-fold splits exist for text tasks only; remove it")
    return {k: getattr(d, k) for k in IMAGE_ONLY}


def seed_split(d: DataKeys, seed: int | None) -> tuple[int, int]:
    """``(split_seed, fold)`` of a run's seed: the configured ones, or with ``data.fold_by_seed``
    fold ``seed mod folds`` of the partition ``split_seed + seed div folds`` (seed 0 when None)."""
    if not d.fold_by_seed or d.folds is None:
        return d.split_seed, d.fold
    s = seed or 0
    return d.split_seed + s // d.folds, s % d.folds


def text_task_options(d: DataKeys, seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`bissl.data.text.load_text_data` beyond the split fractions
    (``folds``, ``fold`` and ``split_seed``; ``seed`` picks the fold under ``data.fold_by_seed``).

    Raises:
        ValueError: an image-only key is set.
    """
    _refuse(d, IMAGE_ONLY, "text")
    split_seed, fold = seed_split(d, seed)
    return {"folds": d.folds, "fold": fold, "split_seed": split_seed}
